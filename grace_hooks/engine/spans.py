"""Subject spans: the token sequences that anchor router keys to the text they were made from.

A router key alone says "this activation looks like the edited subject's". At thousands of edits
that is not enough: the last token of "Giurgiu County" looks like the last token of any "...
County", and first tokens of a text all look alike (benchmarks/results-pages/routing.md, issue 16). A key with
a span is in scope only where the token ids of its subject occur in the text as well:

- ``end`` anchor (keys at the last subject token: routed deltas, COMEBA-HK's router gate): the span
  must end at the position itself;
- ``seen`` anchor (keys elsewhere, e.g. GRACE's at the last prompt token): the span must end at the
  position or before it, in the same sequence. Such a key may also carry *closing* spans, the
  tokens of its edit's answer: once the answer has been written after the subject, the key is out
  of scope from the answer's last token on, so an edit ends where its answer ends instead of
  firing on the tokens it generated itself ("Zorbatown" + "own" + "own" ..., issue 18). A later
  mention of the subject opens it again.

A subject has one span per tokenisation it can take (after a space, or at the start of a text).
Candidates are found by hashing the token n-grams that end at each position, so the cost per
position depends on the number of distinct span lengths, not on the number of keys; the key's
radius test then runs on those candidates only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ANCHORS = ("end", "seen")
NO_TOKEN = -1  # padding, or a position before the start of what the runtime was shown
MAX_SPAN = 64  # longest span kept in the token history between cached forwards
Span = tuple[int, ...]


def subject_spans(tokenizer, subject: str) -> list[list[int]]:
    """The token ids ``subject`` (or an answer) takes after a space and at the start of a text
    (distinct ones)."""
    out: list[list[int]] = []
    for text in (" " + subject.strip(), subject.strip()):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if ids and ids not in out and len(ids) <= MAX_SPAN:
            out.append(list(ids))
    return out


class SpanIndex:
    """Which router keys each token span anchors. Keys without spans are not held here."""

    def __init__(self) -> None:
        self._keys: dict[Span, list[int]] = {}  # span -> key ids
        self._spans: dict[int, list[Span]] = {}  # key id -> its spans
        self.anchor: dict[int, str] = {}  # key id -> 'end' | 'seen'
        self._closers: dict[Span, list[int]] = {}  # answer span -> 'seen' key ids it closes
        self._closing: dict[int, list[Span]] = {}  # key id -> its answer spans

    def __len__(self) -> int:
        return len(self._spans)

    def add(self, key_ids: np.ndarray, spans: list[list[list[int]]], anchor: str,
            closers: list[list[list[int]]] | None = None) -> None:
        """Index ``spans[i]`` as the spans of key ``key_ids[i]``; ``closers[i]``: its answer spans
        (only for the 'seen' anchor)."""
        if anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
        if len(spans) != len(key_ids) or (closers is not None and len(closers) != len(key_ids)):
            raise ValueError(f"{len(key_ids)} keys but {len(spans)} span lists / {len(closers or ())} closer lists")
        if closers is not None and anchor != "seen":
            raise ValueError("closing spans are for 'seen'-anchored keys (an 'end' key fires only where its span ends)")
        for i, key_id in enumerate(np.asarray(key_ids).tolist()):
            self.anchor[key_id] = anchor
            self._spans[key_id] = _index_spans(self._keys, key_id, spans[i])
            if closers is not None:
                self._closing[key_id] = _index_spans(self._closers, key_id, closers[i])

    def remove(self, key_ids: np.ndarray) -> None:
        for key_id in np.asarray(key_ids).tolist():
            _unindex_spans(self._keys, key_id, self._spans.pop(key_id, ()))
            _unindex_spans(self._closers, key_id, self._closing.pop(key_id, ()))
            self.anchor.pop(key_id, None)

    def __contains__(self, key_id: int) -> bool:
        return key_id in self._spans

    def lengths(self, table: dict[Span, list[int]] | None = None) -> list[int]:
        return sorted({len(s) for s in (self._keys if table is None else table)})

    def ends(self, tokens: np.ndarray, start: int = 0, table: dict[Span, list[int]] | None = None) -> list[list[tuple[int, int]]]:
        """For each row of ``tokens`` (batch, T; NO_TOKEN for padding): (position, key id) of every
        span (of ``table``: subject spans by default) that ends at a position from ``start`` on (it
        may begin before ``start``), in position order."""
        table = self._keys if table is None else table
        out: list[list[tuple[int, int]]] = [[] for _ in range(len(tokens))]
        lengths = self.lengths(table)
        if not lengths:
            return out
        for row, seq in enumerate(tokens.tolist()):
            for t in range(start, len(seq)):
                if seq[t] == NO_TOKEN:
                    continue
                for m in lengths:
                    if m > t + 1:
                        break
                    for key_id in table.get(tuple(seq[t - m + 1:t + 1]), ()):
                        out[row].append((t, key_id))
        return out

    def candidates(self, tokens: np.ndarray, width: int, seen: list[set] | None) -> tuple[np.ndarray, np.ndarray]:
        """(flat position over ``batch x width``, key id) of every key whose anchor allows it at one of
        the last ``width`` positions of ``tokens``. ``seen``: per row, the 'seen'-anchored keys whose
        span occurred in earlier forwards of the same sequences and whose answer has not ended since;
        updated in place."""
        start = tokens.shape[1] - width
        flat, ids = [], []
        closes = self.ends(tokens, start, self._closers) if self._closers else [[] for _ in range(len(tokens))]
        for row, hits in enumerate(self.ends(tokens, start)):
            carried = seen[row] if seen is not None else set()
            events: dict[int, list[tuple[int, int]]] = {}  # 'seen' key -> (position, +1 open / -1 close)
            for t, key_id in hits:
                if self.anchor[key_id] == "end":
                    flat.append(row * width + t - start)
                    ids.append(key_id)
                else:
                    events.setdefault(key_id, []).append((t, 1))
            for t, key_id in closes[row]:
                events.setdefault(key_id, []).append((t, -1))
            for key_id in carried | set(events):
                is_open, since = key_id in carried, start
                for t, kind in sorted(events.get(key_id, ()), key=lambda e: (e[0], e[1])):  # a close, then an open, at t
                    if kind > 0 and not is_open:
                        is_open, since = True, t
                    elif kind < 0 and is_open:  # in scope up to the answer's last token, not at it
                        flat += [row * width + c - start for c in range(since, t)]
                        ids += [key_id] * (t - since)
                        is_open = False
                if is_open:
                    flat += [row * width + c - start for c in range(since, start + width)]
                    ids += [key_id] * (start + width - since)
                    carried.add(key_id)
                else:
                    carried.discard(key_id)
        return np.asarray(flat, dtype=np.int64), np.asarray(ids, dtype=np.int64)


def _index_spans(table: dict[Span, list[int]], key_id: int, spans: list[list[int]]) -> list[Span]:
    # a span given twice (an answer that tokenises alike after a space and at the start) is indexed once
    tuples = list(dict.fromkeys(tuple(int(t) for t in s) for s in spans if len(s)))
    for s in tuples:
        table.setdefault(s, []).append(key_id)
    return tuples


def _unindex_spans(table: dict[Span, list[int]], key_id: int, spans) -> None:
    for s in set(spans):
        left = [k for k in table.get(s, ()) if k != key_id]
        if left:
            table[s] = left
        else:
            table.pop(s, None)


SCOPES = ("span", "key")
SCOPE_HELP = ("router scope rule: 'span' (a key fires only where the text also holds its subject's tokens; "
              "precise at 10,000 edits) or 'key' (the key's radius alone)")


def request_spans(tokenizer, requests) -> list[list[list[int]]]:
    """``KeyRouting.subject_spans`` of a pack: the spans of each request's subject, in request order."""
    return [subject_spans(tokenizer, r.subject) for r in requests]


def request_answer_spans(tokenizer, requests) -> list[list[list[int]]]:
    """``KeyRouting.answer_spans`` of a pack: the spans of each request's new target (closing spans)."""
    return [subject_spans(tokenizer, r.target_new) for r in requests]


@dataclass
class KeyRouting:
    """What a pack's router keys stand for, read by the core for every routed method: the requests
    each key serves (recall; the spans a key inherits) and the token spans of each request's subject
    and answer (scope 'span'). A pack's own field; format v1 keeps these fields in the header's
    ``state`` object (grace_hooks.store.header merges and splits them)."""

    key_requests: dict[str, list[list[int]]] | None = None  # site -> per router key, the requests it serves
    subject_spans: list[list[list[int]]] | None = None  # per request, its subject's token spans (scope 'span')
    answer_spans: list[list[list[int]]] | None = None  # per request, its new target's spans (a key closes there)

    def without_request(self, index: int) -> tuple["KeyRouting", dict[str, list[int]]]:
        """The routing with request ``index`` gone (later requests renumbered), and per site the router
        keys kept: every key that serves another request too (it stops serving this one)."""
        kept: dict[str, list[int]] = {}
        served: dict[str, list[list[int]]] = {}
        for site, keys in (self.key_requests or {}).items():
            kept[site] = [k for k, reqs in enumerate(keys) if any(r != index for r in reqs)]
            served[site] = [[r - (r > index) for r in keys[k] if r != index] for k in kept[site]]
        drop = (lambda per: None if per is None else per[:index] + per[index + 1:])
        return (KeyRouting(served if self.key_requests is not None else None, drop(self.subject_spans),
                           drop(self.answer_spans)), kept)

    def spans(self, site: str, field: str = "subject_spans") -> list[list[list[int]]] | None:
        """Per router key at ``site``, the spans (``field``: subject or answer spans) of the requests it
        serves; None for a pack without them (subject spans: made with scope 'key', or before spans
        existed; answer spans: made before issue 18)."""
        by_request = getattr(self, field)
        if by_request is None:
            return None
        return [[s for r in requests for s in by_request[r]] for requests in self.key_requests[site]]

    def problems(self, n_requests: int, keys_per_site: dict[str, int]) -> list[str]:
        """What is wrong with the spans and the ``key_requests`` they are read through (``keys_per_site``:
        how many router keys the pack has at each site), given fields of the declared types (a header's
        are checked as it is read). A token id the model does not have never matches, so ids are only
        checked to be >= 0."""
        if self.subject_spans is None:
            return ["state.answer_spans needs state.subject_spans (an answer closes a key its subject opened)"] \
                if self.answer_spans is not None else []
        for field in ("subject_spans", "answer_spans"):
            spans = getattr(self, field)
            if spans is not None and (len(spans) != n_requests or not all(
                    0 < len(s) <= MAX_SPAN and all(0 <= t < 2**31 for t in s) for per in spans for s in per)):
                return [f"state.{field} must list, for each of the {n_requests} requests, lists of 1 to {MAX_SPAN} token ids"]
        owners = self.key_requests
        if owners is None or not all(
                site in owners and len(owners[site]) == n and all(0 <= r < n_requests for o in owners[site] for r in o)
                for site, n in keys_per_site.items()):
            return [f"state.key_requests must map each site to one list per router key of request indices "
                    f"(0..{n_requests - 1}); keys per site: {keys_per_site}"]
        return []
