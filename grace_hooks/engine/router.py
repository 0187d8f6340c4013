"""The key router: which edit, if any, covers each activation entering a site.

One :class:`KeyRouter` per site holds the keys of every loaded pack in a FAISS ``IndexIDMap2``
over an exact flat L2 index, so ids are stable and removable. Each key has its own radius; a
query is in scope of a key when their Euclidean distance is <= the radius, and, for a key that
carries subject spans (:mod:`grace_hooks.engine.spans`), when the text holds its subject there too: such
keys are tested only at the positions their spans allow, so their cost does not grow with the
number of keys. Where several keys cover a query the key of the newest pack wins (highest
``rank``), then the nearest.
:func:`exact_assign` is the pure-torch reference the tests compare against.
"""
from __future__ import annotations

import faiss
import numpy as np
import torch

from .spans import SpanIndex

NO_KEY = -1


def _choose(query_idx: np.ndarray, dist2: np.ndarray, ids: np.ndarray, rank: np.ndarray, n_queries: int) -> np.ndarray:
    """Among the (query, key) hits, keep per query the newest-ranked key, then the nearest."""
    out = np.full(n_queries, NO_KEY, dtype=np.int64)
    if len(ids) == 0:
        return out
    order = np.lexsort((dist2, -rank[ids], query_idx))
    q_sorted = query_idx[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = q_sorted[1:] != q_sorted[:-1]
    out[q_sorted[first]] = ids[order][first]
    return out


SUPPRESSED = -1.0  # a radius no distance is within: the key never fires (it stays, and comes back with drop_overrides)


class KeyRouter:
    """FAISS index of edit keys at one site, with per-key radius, rank and flags."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._index = faiss.IndexIDMap2(faiss.IndexFlatL2(dim))
        self._next_id = 0
        self._radius = np.zeros(0, dtype=np.float32)  # effective radius by id
        self._base_radius = np.zeros(0, dtype=np.float32)
        self._rank = np.zeros(0, dtype=np.int64)
        self._last_only = np.zeros(0, dtype=bool)
        self._alive = np.zeros(0, dtype=bool)
        self._anchored = np.zeros(0, dtype=bool)  # keys with subject spans (tested only where they allow)
        self.spans = SpanIndex()
        self._overrides: dict[int, dict[object, float]] = {}  # id -> {owner: shrunk radius}

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def add(self, keys: np.ndarray, radii: np.ndarray, rank: int, last_only: bool = False,
            spans: list[list[list[int]]] | None = None, anchor: str = "end",
            closers: list[list[list[int]]] | None = None) -> np.ndarray:
        """Add keys (ids returned). ``spans``: per key, the token spans that anchor it (None: none);
        ``closers``: per 'seen'-anchored key, the answer spans after which it stops (spans.SpanIndex)."""
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be (n, {self.dim}), got {keys.shape}")
        n = len(keys)
        ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        self._next_id += n
        radii = np.asarray(radii, dtype=np.float32).reshape(n)
        self._radius = np.concatenate([self._radius, radii])
        self._base_radius = np.concatenate([self._base_radius, radii])
        self._rank = np.concatenate([self._rank, np.full(n, rank, dtype=np.int64)])
        self._last_only = np.concatenate([self._last_only, np.full(n, last_only, dtype=bool)])
        self._alive = np.concatenate([self._alive, np.ones(n, dtype=bool)])
        self._anchored = np.concatenate([self._anchored, np.full(n, spans is not None, dtype=bool)])
        if spans is not None:
            self.spans.add(ids, spans, anchor, closers)
        if n:
            self._index.add_with_ids(keys, ids)
        return ids

    def remove(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids):
            self._index.remove_ids(ids)
            self._alive[ids] = False
            self.spans.remove(ids)
            for key_id in ids.tolist():
                self._overrides.pop(key_id, None)

    @property
    def call_dependent(self) -> bool:
        """Whether a live key matches only the last position of a forward call (then where a
        sequence is split into calls changes what fires)."""
        return bool((self._last_only & self._alive).any())

    # --- radius overrides: a later pack may shrink an earlier key (GRACE split across packs) ---
    def shrink(self, key_id: int, radius: float, owner: object) -> None:
        """Hold key ``key_id`` to at most ``radius`` while ``owner`` (a later pack) is loaded;
        :data:`SUPPRESSED` keeps it from ever being in scope (a superseded edit)."""
        if 0 <= key_id < len(self._alive) and self._alive[key_id]:
            self._overrides.setdefault(key_id, {})[owner] = float(radius)
            self._refresh(key_id)

    def override_owners(self, key_id: int) -> list[object]:
        """Who holds key ``key_id`` shrunk or suppressed (later packs)."""
        return list(self._overrides.get(key_id, {}))

    def drop_overrides(self, owner: object) -> None:
        for key_id in [k for k, m in self._overrides.items() if owner in m]:
            del self._overrides[key_id][owner]
            self._refresh(key_id)

    def _refresh(self, key_id: int) -> None:
        shrunk = self._overrides.get(key_id, {})
        self._radius[key_id] = min([self._base_radius[key_id], *shrunk.values()])

    def radius(self, ids: np.ndarray) -> np.ndarray:
        return self._radius[np.asarray(ids, dtype=np.int64)]

    def keys(self, ids: np.ndarray) -> np.ndarray:
        return np.stack([self._index.reconstruct(int(i)) for i in ids]) if len(ids) else np.zeros((0, self.dim), np.float32)

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Euclidean distance to and id of the nearest live key (inf / NO_KEY when empty)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if len(self) == 0:
            return np.full(len(queries), np.inf, np.float32), np.full(len(queries), NO_KEY, np.int64)
        dist2, ids = self._index.search(queries, 1)
        return np.sqrt(np.maximum(dist2[:, 0], 0)), ids[:, 0]

    def in_scope(self, queries: np.ndarray, is_last: np.ndarray | None = None,
                 candidates: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (query index, key id, squared distance) with the query inside the key's radius. Keys
        without spans: one exact range search for all queries. Keys with spans: only the (query
        index, key id) pairs of ``candidates`` (what their spans allow; none when it is None)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        empty = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        if len(self) == 0 or len(queries) == 0:
            return empty
        r2 = np.where(self._radius < 0, -1.0, self._radius.astype(np.float64) ** 2)  # SUPPRESSED: never
        free = self._alive & ~self._anchored
        query_idx, ids, dist2 = empty
        if free.any():
            search_r2 = float(r2[free].max()) * (1 + 1e-5) + 1e-6
            lims, dist2, ids = self._index.range_search(queries, search_r2)
            query_idx = np.repeat(np.arange(len(queries)), np.diff(lims).astype(np.int64))
            keep = ~self._anchored[ids]
            query_idx, ids, dist2 = query_idx[keep], ids[keep], dist2[keep]
        if candidates is not None and len(candidates[0]):
            q, k = candidates
            live = self._alive[k]
            q, k = q[live], k[live]
            d2 = ((queries[q].astype(np.float64) - self._index.reconstruct_batch(k).astype(np.float64)) ** 2).sum(1)
            query_idx, ids = np.concatenate([query_idx, q]), np.concatenate([ids, k])
            dist2 = np.concatenate([dist2.astype(np.float64), d2])
        ok = dist2 <= r2[ids]
        if is_last is not None:
            ok &= ~self._last_only[ids] | np.asarray(is_last, dtype=bool)[query_idx]
        return query_idx[ok], ids[ok], dist2[ok]

    def assign(self, queries: np.ndarray, is_last: np.ndarray | None = None,
               candidates: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Id of the key covering each query (the newest-ranked, then the nearest), or NO_KEY."""
        return self.assign_all(queries, is_last, candidates)[0]

    def assign_all(self, queries: np.ndarray, is_last: np.ndarray | None = None,
                   candidates: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`assign`'s winners, and every (query index, key id) in scope behind them."""
        query_idx, ids, dist2 = self.in_scope(queries, is_last, candidates)
        return _choose(query_idx, dist2, ids, self._rank, len(queries)), query_idx, ids

def exact_assign(queries: torch.Tensor, keys: torch.Tensor, radii: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Reference router in pure torch: same rule as :meth:`KeyRouter.assign` (index into ``keys``)."""
    if len(keys) == 0:
        return torch.full((len(queries),), NO_KEY, dtype=torch.long)
    dist = torch.cdist(queries.double(), keys.double(), compute_mode="donot_use_mm_for_euclid_dist")
    hit = dist <= radii.double()[None, :]
    q_idx, k_idx = hit.nonzero(as_tuple=True)
    return torch.from_numpy(
        _choose(q_idx.numpy(), (dist[q_idx, k_idx] ** 2).numpy(), k_idx.numpy(), rank.numpy(), len(queries))
    )
