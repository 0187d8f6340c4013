"""Edit requests and readers for the record layouts used across the editing literature."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from .errors import EditRequestError


@dataclass(frozen=True)
class EditRequest:
    """One fact to change: ``prompt`` (with ``{}`` for the subject, or the subject verbatim)
    should be completed by ``target_new``. Rephrase/locality fields are for evaluation only."""

    prompt: str
    subject: str
    target_new: str
    ground_truth: str | None = None
    rephrase_prompt: str | None = None
    locality_prompt: str | None = None
    locality_ground_truth: str | None = None
    case_id: str | None = None

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject) if "{}" in self.prompt else self.prompt

    def subject_span(self) -> tuple[int, int]:
        """Character span of the subject inside :attr:`text` (its last occurrence)."""
        start = self.text.rfind(self.subject)
        return start, start + len(self.subject)

    def validate(self) -> "EditRequest":
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise EditRequestError("EditRequest.prompt is empty: give the text the model should complete.")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise EditRequestError(
                f"EditRequest for prompt {self.prompt!r} has an empty target_new: give the new answer text."
            )
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise EditRequestError(f"EditRequest for prompt {self.prompt!r} has an empty subject.")
        if self.prompt.count("{}") > 1:
            raise EditRequestError(f"prompt {self.prompt!r} has more than one '{{}}' placeholder.")
        if self.subject not in self.text:
            raise EditRequestError(
                f"subject {self.subject!r} does not occur in prompt {self.text!r}: put '{{}}' where the "
                "subject goes, or write the subject verbatim inside the prompt."
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}



def _first(value: Any) -> Any:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _from_counterfact_easyedit(rec: dict) -> EditRequest:
    return EditRequest(
        prompt=rec["prompt"], subject=rec["subject"], target_new=rec["target_new"],
        ground_truth=_first(rec.get("ground_truth")), rephrase_prompt=_first(rec.get("rephrase_prompt")),
        locality_prompt=_first(rec.get("locality_prompt")),
        locality_ground_truth=_first(rec.get("locality_ground_truth")),
        case_id=None if rec.get("case_id") is None else str(rec["case_id"]),
    )


def _from_rome(rec: dict) -> EditRequest:
    rw = rec["requested_rewrite"]
    target_true = rw.get("target_true", {})
    neighbours = rec.get("neighborhood_prompts") or []
    neighbour = neighbours[0] if neighbours else None
    if isinstance(neighbour, dict):
        neighbour = neighbour.get("prompt")
    return EditRequest(
        prompt=rw["prompt"], subject=rw["subject"], target_new=rw["target_new"]["str"],
        ground_truth=target_true.get("str"), rephrase_prompt=_first(rec.get("paraphrase_prompts")),
        locality_prompt=neighbour, locality_ground_truth=target_true.get("str"),
        case_id=None if rec.get("case_id") is None else str(rec["case_id"]),
    )


def _from_zsre(rec: dict) -> EditRequest:
    # MEND layout: the edit is src -> alt; loc / loc_ans are an unrelated NQ question.
    return EditRequest(
        prompt=rec["src"], subject=rec["subject"], target_new=rec["alt"],
        ground_truth=_first(rec.get("answers")) or rec.get("pred"), rephrase_prompt=rec.get("rephrase"),
        locality_prompt=rec.get("loc"), locality_ground_truth=rec.get("loc_ans"),
        case_id=None if rec.get("case_id") is None else str(rec["case_id"]),
    )


def record_to_request(rec: dict) -> EditRequest:
    """Convert one record of any supported layout to an :class:`EditRequest`."""
    if not isinstance(rec, dict):
        raise EditRequestError(f"an edit record must be a JSON object, got {type(rec).__name__}")
    if "requested_rewrite" in rec:
        return _from_rome(rec)
    if "src" in rec and "alt" in rec:
        return _from_zsre(rec)
    if {"prompt", "subject", "target_new"} <= set(rec):  # EasyEdit CounterFact, and our own layout
        return _from_counterfact_easyedit(rec)
    raise EditRequestError(
        f"unrecognised edit record with keys {sorted(rec)}: expected CounterFact (EasyEdit: prompt, subject, "
        "target_new), ROME (requested_rewrite) or zsRE (MEND: src, alt, subject) layout."
    )


def read_requests(path: str | Path, limit: int | None = None) -> list[EditRequest]:
    """Read edit requests from a JSON list or JSON-lines file in any supported layout."""
    path = Path(path)
    if not path.is_file():
        raise EditRequestError(f"requests file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        records = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise EditRequestError(f"{path} is neither a JSON list nor JSON lines: {exc}") from exc
    if limit is not None:
        records = records[:limit]
    return [record_to_request(r).validate() for r in records]


def as_requests(items: Iterable[EditRequest | dict]) -> list[EditRequest]:
    """Accept EditRequest objects or records of any layout; validate each."""
    out = []
    for item in items:
        req = item if isinstance(item, EditRequest) else record_to_request(item)
        out.append(req.validate())
    if not out:
        raise EditRequestError("no edit requests given")
    return out
