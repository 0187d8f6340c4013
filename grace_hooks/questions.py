"""Questions the way users ask them, for edit records written as cloze prompts.

A CounterFact record is a cloze ("The mother tongue of Danielle Darrieux is"), which nobody types
into a chat. Its relation is recovered from the prompt through the table in
``grace_hooks/data/questions/counterfact_relations.json`` (each relation: the cloze templates that
identify it, and two questions in our own words), and the record is then asked those questions
about its subject. Its locality prompt names another subject of the same relation in one of the
table's templates; that subject is recovered through the table too, and asked the direct question
of the relation its template names.

Records that are questions already (zsRE: ``src`` is the question, ``rephrase`` a second wording,
``loc`` an unrelated Natural Questions query) are asked as they are.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

from .errors import ConfigError
from .requests import EditRequest

PLACEHOLDER = "{}"
NQ_LABEL = "nq question:"  # MEND's zsRE marks its locality queries with this label; it is not part of the question


def _norm(text: str) -> str:
    """Case and runs of spaces ignored: "the capital of {} is" and "The capital of {}  is" are one template."""
    return " ".join(text.split()).casefold()


def fill(pattern: str, subject: str) -> str:
    """``pattern`` with its placeholder replaced by ``subject`` (plain replacement: a subject may hold braces)."""
    return pattern.replace(PLACEHOLDER, subject, 1)


def is_question(text: str | None) -> bool:
    return bool(text) and text.rstrip().endswith("?")


@dataclass(frozen=True)
class Relation:
    id: str
    question: str  # the direct question, "{}" for the subject
    rephrase: str  # the same question in other words
    templates: tuple[str, ...]
    wikidata: tuple[str, ...] = ()
    edit_question: str | None = None  # a third wording, only for making edits: never asked by the harness


@dataclass(frozen=True)
class Questions:
    """What a record is asked: its question, the second wording, and the question about its locality
    subject (None where it could not be recovered); ``relation`` is None for records that are questions."""

    question: str
    rephrase: str | None
    locality: str | None
    relation: str | None = None
    locality_relation: str | None = None


class RelationTable:
    """Relations keyed by their templates; a template belongs to exactly one relation."""

    def __init__(self, relations: Sequence[Relation]) -> None:
        self.relations = list(relations)
        self._by_template: dict[str, Relation] = {}
        for rel in self.relations:
            for pattern in (rel.question, rel.rephrase, *rel.templates, *([rel.edit_question] if rel.edit_question else [])):
                if pattern.count(PLACEHOLDER) != 1:
                    raise ConfigError(f"relation {rel.id!r}: {pattern!r} must hold exactly one {PLACEHOLDER!r}")
            for t in rel.templates:
                other = self._by_template.setdefault(_norm(t), rel)
                if other is not rel:
                    raise ConfigError(f"template {t!r} is listed under both {other.id!r} and {rel.id!r}")
        # For prompts whose subject is unknown: the template with the most fixed text wins, so
        # "X, which is located in" is read as "{}, which is located in" and not as "{} is located in".
        ordered = sorted((t for r in self.relations for t in r.templates), key=lambda t: -len(t))
        self._patterns = [(re.compile(r"(.+)".join(re.escape(part) for part in " ".join(t.split()).split(PLACEHOLDER)),
                                      re.IGNORECASE), self._by_template[_norm(t)]) for t in ordered]

    @classmethod
    def from_file(cls, path: str | Path) -> "RelationTable":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict) -> "RelationTable":
        """From the layout of ``counterfact_relations.json``: {"relations": [{"id", "question", "rephrase",
        "edit_question"?, "templates", "wikidata"?}, ...]}."""
        return cls([Relation(r["id"], r["question"], r["rephrase"], tuple(r["templates"]), tuple(r.get("wikidata", ())),
                             r.get("edit_question")) for r in data["relations"]])

    def relation_of(self, text: str, subject: str) -> Relation | None:
        """The relation of a cloze ``text`` about ``subject`` (verbatim in it, or ``{}`` in its place)."""
        if PLACEHOLDER in text:
            return self._by_template.get(_norm(text))
        start = text.find(subject)
        while subject and start >= 0:  # a subject named twice: any of its places may be the template's
            rel = self._by_template.get(_norm(text[:start] + PLACEHOLDER + text[start + len(subject):]))
            if rel is not None:
                return rel
            start = text.find(subject, start + 1)
        return None

    def parse(self, text: str) -> tuple[Relation, str] | None:
        """(relation, subject) of a cloze whose subject is not given, or None when no template fits."""
        flat = " ".join(text.split())
        for pattern, rel in self._patterns:
            m = pattern.fullmatch(flat)
            if m and m.group(1).strip():
                return rel, m.group(1).strip()
        return None

    def questions(self, req: EditRequest) -> Questions | None:
        """The questions of one record; None when it is a cloze whose relation the table does not know."""
        if is_question(req.text):
            rephrase = req.rephrase_prompt if is_question(req.rephrase_prompt) else None
            return Questions(req.text, rephrase, _as_question(req.locality_prompt))
        rel = self.relation_of(req.prompt, req.subject)
        if rel is None:
            return None
        loc = self.parse(req.locality_prompt) if req.locality_prompt else None
        return Questions(fill(rel.question, req.subject), fill(rel.rephrase, req.subject),
                         fill(loc[0].question, loc[1]) if loc else None, rel.id, loc[0].id if loc else None)


def edit_question(req: EditRequest, table: "RelationTable | None" = None) -> str | None:
    """The question an edit of ``req`` is also made on (its relation's ``edit_question`` about its subject),
    or None: a record that is a question already, or a cloze whose relation the table does not know."""
    if is_question(req.text):
        return None
    rel = (table or counterfact_table()).relation_of(req.prompt, req.subject)
    return fill(rel.edit_question, req.subject) if rel is not None and rel.edit_question else None


def _as_question(locality: str | None) -> str | None:
    """A question record's locality query as a user would type it: MEND's label dropped, a question mark
    at the end."""
    if not locality:
        return None
    text = locality.strip()
    if text.lower().startswith(NQ_LABEL):
        text = text[len(NQ_LABEL):].strip()
    return text if text.endswith("?") else text + "?"


@lru_cache(maxsize=1)
def counterfact_table() -> RelationTable:
    """The packaged CounterFact relation table."""
    ref = resources.files("grace_hooks") / "data" / "questions" / "counterfact_relations.json"
    return RelationTable.from_dict(json.loads(ref.read_text(encoding="utf-8")))


def coverage(requests: Iterable[EditRequest], table: RelationTable | None = None) -> dict:
    """How many records the table gives questions to, with the prompt shapes it does not know
    (subject replaced by ``{}``) and how many locality questions could be built."""
    table = table or counterfact_table()
    n = matched = locality = own_relation = 0
    missing: Counter[str] = Counter()
    for req in requests:
        n += 1
        q = table.questions(req)
        if q is None:
            missing[req.text.replace(req.subject, PLACEHOLDER) if req.subject else req.text] += 1
            continue
        matched += 1
        locality += q.locality is not None
        own_relation += q.locality_relation is not None and q.locality_relation == q.relation
    return {"records": n, "matched": matched, "share": matched / n if n else None, "with_locality": locality,
            "locality_same_relation": own_relation, "unmatched_shapes": dict(missing.most_common())}
