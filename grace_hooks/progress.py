"""Progress of long, once-per-model work (sampling the C0 corpus, measuring C0) that a person sees
without ``-v``: a tqdm bar on a terminal, and where no terminal shows one (a log file, a CI job, a
notebook's captured stderr) INFO lines at every quarter, so no long step is ever silent."""
from __future__ import annotations

import logging
import time

from tqdm.auto import tqdm

QUARTERS = (25, 50, 75)


class Progress:
    """``update(n)`` towards ``total``; ``close()`` logs how long it took. Use as a context manager."""

    def __init__(self, log: logging.Logger, total: int, desc: str, unit: str) -> None:
        self.log, self.total, self.desc, self.unit = log, max(1, int(total)), desc, unit
        self.bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False, disable=None)
        self.done, self._said, self._start = 0, 0, time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(n)
        if not self.bar.disable:  # the bar shows it
            return
        percent = 100 * self.done // self.total
        while self._said < len(QUARTERS) and percent >= QUARTERS[self._said]:
            self.log.info("%s: %d%% (%d of %d %s, %.0f s so far)", self.desc, QUARTERS[self._said], self.done, self.total,
                          self.unit, time.perf_counter() - self._start)
            self._said += 1

    def close(self) -> float:
        """Closes the bar; returns the seconds since the start."""
        self.bar.close()
        return time.perf_counter() - self._start

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Progress"]
