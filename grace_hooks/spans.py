"""Subject spans: the token sequences that anchor router keys to the text they were made from.

A router key alone says "this activation looks like the edited subject's". At thousands of edits
that is not enough: the last token of "Giurgiu County" looks like the last token of any "...
County", and first tokens of a text all look alike (benchmarks/RESULTS.md, issue 16). A key with
a span is in scope only where the token ids of its subject occur in the text as well:

- ``end`` anchor (keys at the last subject token: routed deltas, COMEBA-HK's router gate): the span
  must end at the position itself;
- ``seen`` anchor (keys elsewhere, e.g. GRACE's at the last prompt token): the span must end at the
  position or before it, in the same sequence.

A subject has one span per tokenisation it can take (after a space, or at the start of a text).
Candidates are found by hashing the token n-grams that end at each position, so the cost per
position depends on the number of distinct span lengths, not on the number of keys; the key's
radius test then runs on those candidates only.
"""
from __future__ import annotations

import numpy as np

ANCHORS = ("end", "seen")
NO_TOKEN = -1  # padding, or a position before the start of what the runtime was shown
MAX_SPAN = 64  # longest span kept in the token history between cached forwards
Span = tuple[int, ...]


def subject_spans(tokenizer, subject: str) -> list[list[int]]:
    """The token ids ``subject`` takes after a space and at the start of a text (distinct ones)."""
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

    def __len__(self) -> int:
        return len(self._spans)

    def add(self, key_ids: np.ndarray, spans: list[list[list[int]]], anchor: str) -> None:
        if anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
        if len(spans) != len(key_ids):
            raise ValueError(f"{len(key_ids)} keys but {len(spans)} span lists")
        for key_id, key_spans in zip(np.asarray(key_ids).tolist(), spans):
            tuples = [tuple(int(t) for t in s) for s in key_spans if len(s)]
            self._spans[key_id] = tuples
            self.anchor[key_id] = anchor
            for s in tuples:
                self._keys.setdefault(s, []).append(key_id)

    def remove(self, key_ids: np.ndarray) -> None:
        for key_id in np.asarray(key_ids).tolist():
            for s in self._spans.pop(key_id, ()):
                left = [k for k in self._keys[s] if k != key_id]
                if left:
                    self._keys[s] = left
                else:
                    del self._keys[s]
            self.anchor.pop(key_id, None)

    def __contains__(self, key_id: int) -> bool:
        return key_id in self._spans

    def lengths(self) -> list[int]:
        return sorted({len(s) for s in self._keys})

    def ends(self, tokens: np.ndarray, start: int = 0) -> list[list[tuple[int, int]]]:
        """For each row of ``tokens`` (batch, T; NO_TOKEN for padding): (position, key id) of every
        span that ends at a position from ``start`` on (it may begin before ``start``)."""
        out: list[list[tuple[int, int]]] = [[] for _ in range(len(tokens))]
        lengths = self.lengths()
        for row, seq in enumerate(tokens.tolist()):
            for t in range(start, len(seq)):
                if seq[t] == NO_TOKEN:
                    continue
                for m in lengths:
                    if m > t + 1:
                        break
                    for key_id in self._keys.get(tuple(seq[t - m + 1:t + 1]), ()):
                        out[row].append((t, key_id))
        return out

    def candidates(self, tokens: np.ndarray, width: int, seen: list[set] | None) -> tuple[np.ndarray, np.ndarray]:
        """(flat position over ``batch x width``, key id) of every key whose anchor allows it at one of
        the last ``width`` positions of ``tokens``. ``seen``: per row, the 'seen'-anchored keys whose
        span occurred in earlier forwards of the same sequences; updated in place."""
        start = tokens.shape[1] - width
        flat, ids = [], []
        for row, hits in enumerate(self.ends(tokens, start)):
            carried = seen[row] if seen is not None else set()
            opened: dict[int, int] = {}  # 'seen' key -> first position (in this call) its span ended
            for t, key_id in hits:
                if self.anchor[key_id] == "end":
                    flat.append(row * width + t - start)
                    ids.append(key_id)
                elif key_id not in carried:
                    opened[key_id] = min(opened.get(key_id, t), t)
            for key_id in carried:
                flat += [row * width + c for c in range(width)]
                ids += [key_id] * width
            for key_id, t in opened.items():
                first = t - start
                flat += [row * width + c for c in range(first, width)]
                ids += [key_id] * (width - first)
                carried.add(key_id)
        return np.asarray(flat, dtype=np.int64), np.asarray(ids, dtype=np.int64)


SCOPES = ("span", "key")
SCOPE_HELP = ("router scope rule: 'span' (a key fires only where the text also holds its subject's tokens; "
              "precise at 10,000 edits) or 'key' (the key's radius alone)")


def request_spans(tokenizer, requests) -> list[list[list[int]]]:
    """``state['subject_spans']`` of a pack: the spans of each request's subject, in request order."""
    return [subject_spans(tokenizer, r.subject) for r in requests]


def key_spans(state: dict, site: str) -> list[list[list[int]]] | None:
    """Per router key at ``site``, the spans of the requests it serves (``state['key_requests']``);
    None for a pack without subject spans (made with scope 'key', or before spans existed)."""
    if "subject_spans" not in state:
        return None
    by_request = state["subject_spans"]
    return [[s for r in requests for s in by_request[r]] for requests in state["key_requests"][site]]


def span_state_problems(state: dict, n_requests: int, keys_per_site: dict[str, int]) -> list[str]:
    """What is wrong with a pack's ``subject_spans`` and the ``key_requests`` they are read through
    (``keys_per_site``: how many router keys the pack has at each site). A token id the model does
    not have never matches, so ids are only checked to be ints >= 0."""
    spans = state.get("subject_spans")
    if spans is None:
        return []
    ok = isinstance(spans, list) and len(spans) == n_requests and all(
        isinstance(per, list) and all(isinstance(s, list) and 0 < len(s) <= MAX_SPAN and all(
            type(t) is int and 0 <= t < 2**31 for t in s) for s in per) for per in spans)
    if not ok:
        return [f"state.subject_spans must list, for each of the {n_requests} requests, lists of 1 to {MAX_SPAN} token ids"]
    owners = state.get("key_requests")
    if not isinstance(owners, dict) or not all(
            isinstance(owners.get(site), list) and len(owners[site]) == n
            and all(isinstance(o, list) and all(type(r) is int and 0 <= r < n_requests for r in o) for o in owners[site])
            for site, n in keys_per_site.items()):
        return [f"state.key_requests must map each site to one list per router key of request indices "
                f"(0..{n_requests - 1}); keys per site: {keys_per_site}"]
    return []
