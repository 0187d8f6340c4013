"""Per-model results reused across edits and pack loads, forgotten when the weights change.

One rule for every in-memory cache derived from a model (the base fingerprint of a pack's sites, the
model digest, context prefixes, C0, corpus probes): an entry holds while the model's weights are the
ones it was made from. The weights' version is read from torch, which counts every in-place write of
a tensor (``_version``) and gives a new storage a new address, so a write through ``load_state_dict``,
an optimiser or ``.to()`` invalidates it; nothing has to be told. On-disk caches (C0, sampled corpora)
are keyed by content instead (:mod:`grace_hooks.locate.covariance`): they outlive the process.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Hashable, TypeVar

from torch import nn

T = TypeVar("T")


def weights_version(model: nn.Module) -> int:
    """A number that changes whenever a parameter of ``model`` is written in place or replaced."""
    return hash(tuple((p.data_ptr(), p._version) for p in model.parameters()))


class WeightMemo:
    """Results derived from one model's weights, keyed by what else they depend on."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._version: int | None = None
        self._store: dict[Hashable, Any] = {}
        self._lock = threading.RLock()

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        """The result stored under ``key`` for the current weights, made by ``make()`` when missing
        (everything stored is dropped once the weights have changed). ``make`` runs without the
        memo's lock (it may run forwards, which take the runtime's): two threads may both make a
        missing entry, and the first stored is kept."""
        version = weights_version(self.model)
        with self._lock:
            if version != self._version:
                self._store.clear()
                self._version = version
            if key in self._store:
                return self._store[key]
        value = make()
        with self._lock:
            if self._version != version:  # the weights changed meanwhile: keep nothing made from the old ones
                return value
            return self._store.setdefault(key, value)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return self._version == weights_version(self.model) and key in self._store

    def clear(self) -> None:
        with self._lock:
            self._store.clear()


__all__ = ["WeightMemo", "weights_version"]
