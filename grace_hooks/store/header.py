"""``edit_pack.json``, declared: the header's schema (:class:`PackHeader`, checked by the generic
validator of :mod:`.typed`), and the one place where a pack's typed parts become JSON and back:
the method's config and state (its dataclasses) and the router's fields (:class:`KeyRouting`).

On disk (format v1) the router's fields sit in the header's ``state`` object beside the method's
own entries; in memory they are the pack's ``routing``. :func:`state_json` merges them,
:func:`read_state` splits them apart again.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bases.architectures import ARCHITECTURES, Site
from ..config import make_config
from ..engine.spans import KeyRouting
from ..errors import ArchitectureError, ConfigError, PackError
from .typed import Invalid, field_names, from_json, must, to_json

FORMAT_VERSION = 1
_ID_RE = re.compile(r"[A-Za-z0-9-]{1,64}")
ROUTING_FIELDS = field_names(KeyRouting)
FIX = ("the pack is corrupt or was not written by grace_hooks: restore its folder from a copy, or make it again "
       "from its requests (grace-hooks edit)")


def corrupt(where: Path, problem: object) -> PackError:
    """The error for a header that does not fit its schema: the file, what is wrong, what to do."""
    return PackError(f"{where}: {problem}; {FIX}")


def _site_names(sites: list[str]) -> str | None:
    if not sites or len(set(sites)) != len(sites):
        return "must be a non-empty list of distinct site names"
    for s in sites:
        try:
            Site.parse(s)
        except ArchitectureError as exc:
            return f"has a {exc}"
    return None


def _pack_id(value: str) -> str | None:
    return None if not value or _ID_RE.fullmatch(value) else "must be 1-64 letters, digits or '-'"


@dataclass
class BaseInfo:
    name: str
    model_type: str
    fingerprint: str


@dataclass(frozen=True)
class Superseded:
    """A router key of an earlier pack that a later pack supersedes: it never fires while the later
    pack is loaded (``edit(..., supersede=True)``)."""

    pack_id: str = must("the pack_id of the earlier pack", _pack_id)
    site: str = must("a site name")
    key: int = must("a key index >= 0", lambda k: None if k >= 0 else "must be >= 0")
    request: int | None = None  # the request of the superseding pack that conflicts with it


@dataclass(kw_only=True)
class PackHeader:
    """The fields of ``edit_pack.json``, in the order they are written. The method checks its own
    parts (``method_config``, its entries of ``state``) against its classes."""

    format_version: int = FORMAT_VERSION
    name: str = ""
    pack_id: str = must("1-64 letters, digits or '-'", _pack_id, default="")
    method: str = must("a method name (a string)")
    method_config: dict[str, Any] = must("an object of options")
    sites: list[str] = must("a non-empty list of distinct site names", _site_names)
    base_model: BaseInfo = must("an object giving name, model_type and fingerprint as strings")
    created_at: str = ""
    library_version: str = ""
    n_edits: int | None = None  # len(requests), for a reader of the file
    requests: list[dict[str, Any]] = must("a list of edit-request objects")
    state: dict[str, Any] = must("an object", default_factory=dict)
    metrics: dict[str, Any] = must("an object", default_factory=dict)
    tensors_sha256: str = must("a hex string (the checksum of edit_pack.safetensors)")
    supersedes: list[Superseded] | None = must("a list of {pack_id, site, key} objects", default=None)  # None: not written


def _version(text: str) -> tuple[int, ...]:
    """'0.2.0' -> (0, 2, 0); text without numbers -> () (older than any release)."""
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def check_header(raw: Any, jpath: Path) -> PackHeader:
    """``edit_pack.json``'s parsed JSON as a :class:`PackHeader`; :class:`PackError` naming the file
    and the field that is wrong (methods check their own parts when they read them)."""
    if not isinstance(raw, dict):
        raise corrupt(jpath, "must hold a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:  # a newer format is not judged by this version's schema
        raise PackError(
            f"{jpath.parent.name}: unknown pack format_version {version!r}; this grace_hooks reads version {FORMAT_VERSION}. "
            "Upgrade grace_hooks or re-export the pack."
        )
    try:
        header = from_json(PackHeader, raw)
    except Invalid as exc:
        raise corrupt(jpath, exc) from None
    spec = ARCHITECTURES.get(header.base_model.model_type)
    made = header.library_version
    if spec is not None and spec.written_since and _version(made) < _version(spec.written_since):
        raise PackError(f"{jpath}: made with grace_hooks {made or '(version unknown)'}, when effects on "
                        f"{header.base_model.model_type!r} were added before {sorted(set(spec.written_at.values()))}; "
                        f"since {spec.written_since} they are added after it, so this pack would act otherwise. "
                        "Compute it again from its requests (`grace-hooks edit`)")
    return header


# ---------------------------------------------------------------------- the method's parts
def read_config(config_class: type, data: dict[str, Any], method: str, pack: str) -> Any:
    """A stored ``method_config`` as the method's typed config: options it does not store take the
    class's defaults, retired ones are dropped where they asked for what runs now."""
    try:
        return make_config(config_class, base=data)
    except (ConfigError, TypeError, ValueError) as exc:
        raise PackError(f"pack {pack!r}: its method_config is not a valid {method} config ({exc}). The pack is corrupt "
                        "or was made by another version; re-create it from its requests (grace-hooks edit)") from None


def state_json(state: Any, routing: KeyRouting) -> dict[str, Any]:
    """The header's ``state``: the method's entries, then the router's (fields holding None left out)."""
    return {**to_json(state, drop_none=True), **to_json(routing, drop_none=True)}


def read_state(state_class: type, data: dict[str, Any]) -> tuple[Any, KeyRouting]:
    """The header's ``state`` as (the method's ``state_class``, the router's fields); :class:`Invalid`
    at the first entry of the wrong type."""
    routing = from_json(KeyRouting, {k: v for k, v in data.items() if k in ROUTING_FIELDS}, "state")
    return from_json(state_class, {k: v for k, v in data.items() if k not in ROUTING_FIELDS}, "state"), routing


@dataclass
class NoState:
    """The state of a method that keeps none of its own."""


__all__ = ["BaseInfo", "Superseded", "FIX", "FORMAT_VERSION", "NoState", "PackHeader", "ROUTING_FIELDS", "check_header", "corrupt", "read_config",
           "read_state", "state_json"]
