"""The effect interface: what a method family does at a site, composed by the runtime without
knowing what kind of edit it is (PEFT's lesson: the core never changes for a new method).

A family brings two classes:

- an :class:`Effect`: what one pack places at one site (a dataclass of tensors), and what health,
  export and squash may ask of it: its dense update ``dense_update()`` where one exists, whether it
  acts at every position (``everywhere``), its LoRA form ``lora()`` where one exists;
- an :class:`EffectLayer`: every loaded effect of the family at one site (one per site, like a
  PEFT tuner layer), which says what the family does to the site's output in one forward.

A pack contributes an effect plus, optionally, router keys (``runtime.SiteContribution``). Each
forward the runtime asks every layer at the site, in ``order`` (then the order they were made):

1. ``everywhere(x, y)``: the output after the changes that act at every position (a global delta);
2. ``gate(x, valid, past, context)``: positions the family claims without a key (a gate of its own,
   e.g. a z-score); ``context`` (:class:`GateContext`) is all it sees of the forward beyond its input;
3. the shared router finds the keys in scope (:class:`Hits`), then ``plan(...)`` returns what the
   family does at the positions in scope (a function that changes the flat output in place), or
   None. A layer with ``exclusive = True`` claims a position whole where one of its keys wins it:
   no other family adds anything there (GRACE's replacement).

Positions that no layer claims are never touched, so unrelated text stays bit-identical.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Collection, Mapping

import numpy as np
import torch

from .router import NO_KEY

Plan = Callable[[torch.Tensor], None]  # changes the flat site output (n_positions, d_out) in place


class NoLoraForm(Exception):
    """An effect that a LoRA adapter cannot express; the message says why (export shows it)."""


def stored(t: torch.Tensor | None) -> torch.Tensor | None:
    """A pack tensor as the runtime keeps it: detached float32 on the CPU."""
    return None if t is None else t.detach().float().cpu()


def gate_label(name: str) -> str:
    """How a trace names a position that a family's own gate claimed (no key behind it). Pack
    names cannot hold '<', so a label never equals a pack's name."""
    return f"<{name} gate>"


def is_gate_label(pack: str) -> bool:
    return pack.startswith("<") and pack.endswith(" gate>")


class Effect(ABC):
    """What one pack does at one site. Subclasses are dataclasses of tensors and name their layer."""

    layer: ClassVar[type["EffectLayer"]]

    @abstractmethod
    def stored(self) -> "Effect":
        """A copy as the runtime keeps it (detached float32 tensors on the CPU: :func:`stored`)."""

    @property
    def everywhere(self) -> bool:
        """Whether it acts at every position (else only where its keys or its gate say)."""
        return False

    def dense_update(self) -> torch.Tensor | None:
        """The (d_out, d_in) float64 matrix it adds to the site's weight where it acts, or None when
        it is no weight update (health: |W0 + sum dW|_F / |W0|_F)."""
        return None

    def lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, d_in), B (d_out, r)) with B A its update at every position (export to PEFT);
        raises :class:`NoLoraForm` saying why there is none."""
        raise NoLoraForm("it stores no weight delta; peft export applies to weight-delta packs (memit, encore, "
                         "oedit in mode=global)")


@dataclass(frozen=True)
class GateContext:
    """What a layer's gate reads of the forward it runs in, beyond the site input: the calling
    thread's options (``EditRuntime.option``, e.g. COMEBA-HK's hook layers acting everywhere;
    read-only) and what this layer keeps at this site between the thread's forwards (``kept``: a
    dict of its own, empty on the thread's first forward; e.g. the z-score gate's running statistics)."""

    options: Mapping[str, Any]
    kept: dict[str, Any]


@dataclass
class Gate:
    """Positions a layer claims without a key in one forward."""

    fire: torch.Tensor  # (n_positions,) bool, over the flat positions of the site input
    label: str | None = None  # how traces name these fires (None: not traced)
    data: Any = None  # what the layer computed on the way, handed back to its ``plan``


class Hits:
    """What the router found at a site in one forward: the winning key of each queried position
    (newest pack, then nearest) and every (position, key) pair in scope."""

    def __init__(self, rows: torch.Tensor, winners: np.ndarray, pair_q: np.ndarray, pair_k: np.ndarray,
                 owner: list[str], exclusive: np.ndarray) -> None:
        self.rows, self.winners, self.pair_q, self.pair_k = rows, winners, pair_q, pair_k
        self.owner, self.exclusive = owner, exclusive  # by router id: the pack, whether it claims a position whole
        hit = winners != NO_KEY
        self.hit_rows = rows[torch.from_numpy(hit).to(rows.device)]  # flat positions with a winning key
        self.hit_ids = torch.from_numpy(winners[hit])
        self.hit_owner = np.array([owner[i] for i in self.hit_ids.tolist()], dtype=object)

    def won_by(self, packs: Collection[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat positions, router ids) where the winning key belongs to one of ``packs`` (ascending)."""
        mine = torch.from_numpy(np.array([o in packs for o in self.hit_owner], dtype=bool))
        return self.hit_rows[mine.to(self.hit_rows.device)], self.hit_ids[mine]

    def _adds(self) -> np.ndarray:
        """Per in-scope (position, key) pair: whether the key adds its effect there (it does not claim
        positions whole, and the position's winner does not claim it whole)."""
        claimed = np.zeros(len(self.winners), dtype=bool)
        won = self.winners != NO_KEY
        claimed[won] = self.exclusive[self.winners[won]]
        return ~self.exclusive[self.pair_k] & ~claimed[self.pair_q]

    def acting(self) -> tuple[np.ndarray, np.ndarray]:
        """(flat positions, router ids) of every key that acts: each winner, and each other key in scope
        of a position its winner does not claim whole (routed deltas all add their update there)."""
        won = self.winners != NO_KEY
        extra = (self.pair_k != self.winners[self.pair_q]) & self._adds()
        rows = self.rows.cpu().numpy()
        return (np.concatenate([rows[won], rows[self.pair_q[extra]]]),
                np.concatenate([self.winners[won], self.pair_k[extra]]))

    def pairs_of(self, key_ids: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """(flat positions, index into ``key_ids``) of every in-scope pair of one of ``key_ids`` (one
        pack's router ids, ascending as ``KeyRouter.add`` gives them) that adds its effect (as
        :meth:`in_scope_of` counts them), for effects that act by key rather than by pack."""
        if not len(key_ids):
            return self.rows[:0], np.zeros(0, dtype=np.int64)
        at = np.minimum(np.searchsorted(key_ids, self.pair_k), len(key_ids) - 1)
        mine = (key_ids[at] == self.pair_k) & self._adds()
        return self.rows[torch.from_numpy(self.pair_q[mine]).to(self.rows.device)], at[mine]

    def in_scope_of(self, packs: Collection[str]) -> list[tuple[str, torch.Tensor]]:
        """(pack, flat positions) for each of ``packs`` (in their order) with a key in scope of some
        position, once per position, except where the winning key claims the position whole."""
        keep = self._adds()
        pairs = sorted({(int(q), self.owner[k]) for q, k in zip(self.pair_q[keep].tolist(), self.pair_k[keep].tolist())
                        if self.owner[k] in packs})
        q = np.array([q for q, _ in pairs], dtype=np.int64)
        owners = np.array([o for _, o in pairs], dtype=object)
        at = self.rows[torch.from_numpy(q).to(self.rows.device)]
        out = []
        for pack_id in packs:
            if pack_id in owners:
                out.append((pack_id, at[torch.from_numpy(owners == pack_id).to(at.device)]))
        return out


class EffectLayer:
    """Every loaded effect of one family at one site (oldest first), and what they do in a forward.
    The defaults do nothing; a family overrides what it needs."""

    order: ClassVar[int] = 50  # where its changes go among the families at a site: lower first
    exclusive: ClassVar[bool] = False  # a winning key of this family claims its position whole

    def __init__(self, d_in: int, d_out: int, site: str = "") -> None:
        self.d_in, self.d_out, self.site = d_in, d_out, site
        self.effects: dict[str, Effect] = {}  # pack id -> its effect here, in load order
        self.key_ids: dict[str, np.ndarray] = {}  # pack id -> the router ids of its keys here
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __bool__(self) -> bool:
        return bool(self.effects)

    def add(self, pack_id: str, effect: Effect, key_ids: np.ndarray | None) -> None:
        self.effects[pack_id] = effect
        if key_ids is not None:
            self.key_ids[pack_id] = key_ids
        self._tables.clear()

    def remove(self, pack_id: str) -> None:
        if self.effects.pop(pack_id, None) is not None:
            self.key_ids.pop(pack_id, None)
            self._tables.clear()

    @property
    def causal(self) -> bool:
        """Whether what it does at a position depends only on that position and the ones before it."""
        return True

    def keyed(self, field: str, ids: torch.Tensor) -> torch.Tensor:
        """The rows of the per-key tensor ``field`` (n_keys, ...) of its effects for router ``ids``
        (each id a key of one of its packs)."""
        if field not in self._tables:
            packs = [p for p in self.effects if p in self.key_ids]
            all_ids = np.concatenate([self.key_ids[p] for p in packs]) if packs else np.zeros(0, dtype=np.int64)
            index = np.full(int(all_ids.max()) + 1 if len(all_ids) else 0, -1, dtype=np.int64)
            index[all_ids] = np.arange(len(all_ids))
            table = torch.cat([getattr(self.effects[p], field) for p in packs]) if packs else torch.zeros(0)
            self._tables[field] = (torch.from_numpy(index), table)
        index, table = self._tables[field]
        return table[index[ids]]

    def winning(self, hits: Hits | None, field: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(flat positions where one of its keys wins, the row of ``field`` of each winning key),
        or None where its keys win nothing."""
        if hits is None:
            return None
        rows, ids = hits.won_by(self.effects)
        return (rows, self.keyed(field, ids)) if len(rows) else None

    # --- a forward
    def everywhere(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """The site output ``y`` with the changes that act at every position, or None (none)."""
        return None

    def gate(self, x: torch.Tensor, valid: torch.Tensor, past: int, context: GateContext) -> Gate | None:
        """Positions it claims without a key (``valid``: the real positions, shaped like x without
        its last axis; ``past``: positions earlier calls fed; ``context``: the thread's options and
        what the layer keeps between the thread's forwards, :class:`GateContext`)."""
        return None

    def plan(self, flat_x: torch.Tensor, hits: Hits | None, gate: Gate | None) -> Plan | None:
        """What it does at the positions in scope (``flat_x``: the site input, (n_positions, d_in)),
        as a function of the flat output to change in place; None when it does nothing here."""
        return None


__all__ = ["Effect", "EffectLayer", "Gate", "GateContext", "Hits", "NoLoraForm", "Plan", "gate_label", "is_gate_label", "stored"]
