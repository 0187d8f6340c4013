"""Wall-clock seconds per named phase of a computation, for the metrics an edit reports."""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict


class PhaseClock:
    """``with clock("keys"): ...`` adds the block's seconds to ``clock.seconds["keys"]``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t0

    def report(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}
