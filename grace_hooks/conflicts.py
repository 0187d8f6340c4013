"""Conflicting edits: a new request about the same fact as a request already made.

Two requests conflict when they name the same subject (compared without case and surrounding
space) and ask the same thing of it: the same prompt template, or two templates of one CounterFact
relation (``The mother tongue of {} is`` and ``{} is a native speaker of`` both ask P103, see
:mod:`grace_hooks.questions`). Their targets may differ (a correction) or not (a repeat); both are
reported, since both act on the same inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from .questions import RelationTable, counterfact_table
from .requests import EditRequest, as_requests

THIS_EDIT = "(this edit)"  # the pack named by a conflict between two requests of one new edit


@dataclass(frozen=True)
class Conflict:
    """Request ``request`` of the new edit asks the same as request ``earlier`` of pack ``pack``."""

    request: int
    pack: str
    earlier: int
    subject: str
    why: str  # "same prompt" or "same relation P103"
    earlier_target: str
    target: str

    def describe(self) -> str:
        return (f"request {self.request} ({self.subject!r} -> {self.target!r}) conflicts with request {self.earlier} "
                f"of {self.pack} ({self.subject!r} -> {self.earlier_target!r}): {self.why}")


def _fact(req: EditRequest, table: RelationTable) -> tuple[str, str, str]:
    """(subject, prompt template, relation id or '') of a request, normalised for comparison."""
    relation = table.relation_of(req.prompt, req.subject)
    return req.subject.strip().casefold(), " ".join(req.prompt.split()).casefold(), relation.id if relation else ""


class FactIndex:
    """The requests of one pack by subject, each with its prompt template and relation: read once per
    pack (an edit checks its requests against every loaded pack's index, not against their requests)."""

    def __init__(self, requests: Sequence[EditRequest | dict], table: RelationTable | None = None) -> None:
        table = table or counterfact_table()
        self.by_subject: dict[str, list[tuple[int, EditRequest, tuple[str, str, str]]]] = {}
        for j, r in enumerate(as_requests(requests) if requests else ()):
            fact = _fact(r, table)
            self.by_subject.setdefault(fact[0], []).append((j, r, fact))


def find_conflicts(new: Sequence[EditRequest | dict],
                   loaded: Iterable[tuple[str, Sequence[EditRequest | dict] | FactIndex]],
                   table: RelationTable | None = None) -> list[Conflict]:
    """Every conflict of the ``new`` requests with the requests of the ``loaded`` packs ((name,
    requests or their :class:`FactIndex`), oldest first) and between the new requests themselves
    (pack :data:`THIS_EDIT`)."""
    table = table or counterfact_table()
    indexes = [(name, x if isinstance(x, FactIndex) else FactIndex(x, table)) for name, x in loaded]
    reqs = as_requests(new)
    this = FactIndex([], table)
    out = []
    for i, r in enumerate(reqs):
        fact = _fact(r, table)
        for name, index in indexes + [(THIS_EDIT, this)]:
            for j, other, seen in index.by_subject.get(fact[0], ()):
                why = ("same prompt" if seen[1] == fact[1] else
                       f"same relation {fact[2]}" if fact[2] and seen[2] == fact[2] else "")
                if why:
                    out.append(Conflict(i, name, j, r.subject, why, other.target_new, r.target_new))
        this.by_subject.setdefault(fact[0], []).append((i, r, fact))
    return out


def folder_conflicts(packs: Iterable[tuple[str, Sequence[EditRequest | dict]]],
                     table: RelationTable | None = None) -> list[tuple[str, Conflict]]:
    """(newer pack, conflict) for every conflict among ``packs`` (oldest first): each pack against the
    ones before it and itself (what ``grace-hooks ls`` lists)."""
    table = table or counterfact_table()
    out, before = [], []
    for name, requests in packs:
        out += [(name, c if c.pack != THIS_EDIT else Conflict(c.request, name, c.earlier, c.subject, c.why,
                                                                c.earlier_target, c.target))
                for c in find_conflicts(requests, before, table)]
        before.append((name, requests))
    return out


__all__ = ["Conflict", "FactIndex", "THIS_EDIT", "find_conflicts", "folder_conflicts"]
