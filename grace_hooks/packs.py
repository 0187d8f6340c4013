"""Edit packs on disk (format v1): ``edit_pack.json`` + ``edit_pack.safetensors`` + ``README.md``.

Writes are atomic (a temporary directory renamed into place); reads validate everything and
never unpickle anything (JSON and safetensors only).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .architectures import Site
from .errors import ArchitectureError, FingerprintMismatch, PackError, PackNameError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PACK_JSON = "edit_pack.json"
PACK_TENSORS = "edit_pack.safetensors"
PACK_CARD = "README.md"
MAX_JSON_BYTES = 64 * 2**20
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_CONFIG_ESSENTIALS = ("model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "intermediate_size")


def validate_pack_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise PackNameError(
            f"invalid pack name {name!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit (no '/', no '..', no absolute paths)"
        )
    return name


def base_fingerprint(model: nn.Module, sites: list[str]) -> str:
    """Hash of the config essentials and the weights at ``sites``: what a pack depends on."""
    cfg = model.config.to_dict()
    h = hashlib.sha256(json.dumps({k: cfg.get(k) for k in _CONFIG_ESSENTIALS}, sort_keys=True).encode())
    for name in sorted(sites):
        h.update(name.encode())
        h.update(Site.parse(name).weight(model).detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


@dataclass
class BaseInfo:
    name: str
    model_type: str
    fingerprint: str


@dataclass
class EditPack:
    """The output of one ``edit()`` call with one method. Immutable once written."""

    name: str
    method: str
    config: dict[str, Any]
    sites: list[str]
    base: BaseInfo
    requests: list[dict[str, Any]]
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any] = field(default_factory=dict)  # small method data (labels, radius shrinks)
    metrics: dict[str, Any] = field(default_factory=dict)
    pack_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="microseconds"))
    library_version: str = ""

    @property
    def n_edits(self) -> int:
        return len(self.requests)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def site_tensors(self, site: str) -> dict[str, torch.Tensor]:
        prefix = f"{site}/"
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def header(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION, "name": self.name, "pack_id": self.pack_id, "method": self.method,
            "method_config": self.config, "sites": self.sites, "base_model": vars(self.base),
            "created_at": self.created_at, "library_version": self.library_version, "n_edits": self.n_edits,
            "requests": self.requests, "state": self.state, "metrics": self.metrics,
        }


def _card(pack: EditPack) -> str:
    lines = [
        f"# Edit pack `{pack.name}`", "",
        f"- method: `{pack.method}`; sites: {', '.join(f'`{s}`' for s in pack.sites)}",
        f"- base model: `{pack.base.name}` ({pack.base.model_type}), fingerprint `{pack.base.fingerprint}`",
        f"- created: {pack.created_at} with grace_hooks {pack.library_version}",
        f"- edits: {pack.n_edits}; tensors: {pack.nbytes} bytes", "",
        "| prompt | subject | new target |", "|---|---|---|",
    ]
    for r in pack.requests[:50]:
        cells = [str(r.get(k, "")).replace("|", "\\|") for k in ("prompt", "subject", "target_new")]
        lines.append("| " + " | ".join(cells) + " |")
    if pack.n_edits > 50:
        lines.append(f"| ... {pack.n_edits - 50} more | | |")
    if pack.metrics:
        lines += ["", "Metrics at edit time:", "", "```json", json.dumps(pack.metrics, indent=1, default=str), "```"]
    lines += ["", "Load with `EditableModel.from_pretrained(base, adapters=<this folder's parent>)`; delete the folder to roll back."]
    return "\n".join(lines) + "\n"


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def save_pack(pack: EditPack, directory: str | Path, name: str | None = None, overwrite: bool = False) -> Path:
    """Write ``pack`` to ``directory/name`` atomically; an existing pack is kept unless ``overwrite``."""
    name = validate_pack_name(name or pack.name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / name
    if final.exists() and not overwrite:
        raise PackError(f"a pack named {name!r} already exists in {directory}; pass overwrite=True to replace it")
    tmp = directory / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old = None
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in pack.tensors.items()}
        blob = st_save(tensors, metadata={"format": "grace_hooks.edit_pack", "format_version": str(FORMAT_VERSION), "method": pack.method})
        header = pack.header() | {"tensors_sha256": hashlib.sha256(blob).hexdigest()}
        _fsync_write(tmp / PACK_TENSORS, blob)
        _fsync_write(tmp / PACK_JSON, json.dumps(header, indent=1, default=str).encode())
        _fsync_write(tmp / PACK_CARD, _card(pack).encode())
        if final.exists():
            old = directory / f".{name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists():
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    log.info("saved pack %s (%d edits) to %s", name, pack.n_edits, final)
    return final


def read_header(path: str | Path) -> dict[str, Any]:
    """Parse and check ``edit_pack.json`` (no tensors read)."""
    path = Path(path)
    jpath = path / PACK_JSON
    if not jpath.is_file():
        raise PackError(f"{path} is not an edit pack: {PACK_JSON} is missing")
    if jpath.stat().st_size > MAX_JSON_BYTES:
        raise PackError(f"{jpath} is larger than {MAX_JSON_BYTES} bytes; refusing to parse it")
    try:
        header = json.loads(jpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackError(f"{jpath} is not valid JSON ({exc}); the pack is corrupt") from exc
    if not isinstance(header, dict):
        raise PackError(f"{jpath} must hold a JSON object")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise PackError(
            f"{path.name}: unknown pack format_version {version!r}; this grace_hooks reads version {FORMAT_VERSION}. "
            "Upgrade grace_hooks or re-export the pack."
        )
    missing = [k for k in ("method", "method_config", "sites", "base_model", "requests", "tensors_sha256") if k not in header]
    if missing:
        raise PackError(f"{jpath} lacks required fields {missing}")
    if not isinstance(header["sites"], list) or not all(isinstance(s, str) for s in header["sites"]):
        raise PackError(f"{jpath}: 'sites' must be a list of site names")
    for s in header["sites"]:
        try:
            Site.parse(s)
        except ArchitectureError as exc:
            raise PackError(f"{jpath}: {exc}") from exc
    return header


def load_pack(path: str | Path) -> EditPack:
    """Read and validate a pack folder. The folder name is the pack's name."""
    path = Path(path)
    name = validate_pack_name(path.name)
    header = read_header(path)
    tpath = path / PACK_TENSORS
    if not tpath.is_file():
        raise PackError(f"pack {name!r}: {PACK_TENSORS} is missing; the pack is incomplete")
    blob = tpath.read_bytes()
    if hashlib.sha256(blob).hexdigest() != header["tensors_sha256"]:
        raise PackError(f"pack {name!r}: {PACK_TENSORS} does not match its checksum (truncated or modified)")
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError) as exc:
        raise PackError(f"pack {name!r}: {PACK_TENSORS} is not a valid safetensors file ({exc})") from exc
    sites = set(header["sites"])
    stray = [k for k in tensors if k.split("/", 1)[0] not in sites]
    if stray:
        raise PackError(f"pack {name!r}: tensors {stray[:3]} do not belong to any of its sites {sorted(sites)}")
    base = header["base_model"]
    if not isinstance(base, dict) or not {"name", "model_type", "fingerprint"} <= set(base):
        raise PackError(f"pack {name!r}: base_model must give name, model_type and fingerprint")
    return EditPack(
        name=name, method=header["method"], config=header["method_config"], sites=header["sites"],
        base=BaseInfo(**{k: base[k] for k in ("name", "model_type", "fingerprint")}), requests=header["requests"],
        tensors=tensors, state=header.get("state", {}), metrics=header.get("metrics", {}),
        pack_id=str(header.get("pack_id") or uuid.uuid4().hex), created_at=str(header.get("created_at", "")),
        library_version=str(header.get("library_version", "")),
    )


def check_base(pack: EditPack, model: nn.Module, model_name: str, force: bool = False, actual: str | None = None) -> None:
    """Refuse a pack made for another base (invariant 5) unless ``force``. ``actual``: the model's
    fingerprint at the pack's sites, if already known."""
    actual = actual or base_fingerprint(model, pack.sites)
    if actual == pack.base.fingerprint:
        return
    msg = (
        f"pack {pack.name!r} was made for base model {pack.base.name!r} ({pack.base.model_type}, fingerprint "
        f"{pack.base.fingerprint}) but the loaded model is {model_name!r} ({model.config.model_type}, fingerprint {actual})"
    )
    if not force:
        raise FingerprintMismatch(msg + "; pass force=True to load it anyway")
    log.warning("%s; loading anyway because force=True", msg)


def pack_dirs(directory: str | Path) -> list[Path]:
    """Pack folders in ``directory``, oldest first (by created_at, then name)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        if p.is_dir() and not p.name.startswith(".") and (p / PACK_JSON).is_file():
            try:
                created = str(json.loads((p / PACK_JSON).read_text(encoding="utf-8")).get("created_at", ""))
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                created = ""  # load_pack will report the corruption
            found.append((created, p.name, p))
    return [p for _, _, p in sorted(found)]
