"""Edit packs on disk (format v1): ``edit_pack.json`` + ``edit_pack.safetensors`` + ``README.md``.

Writes are atomic (a temporary directory renamed into place); reads validate everything and
never unpickle anything (JSON and safetensors only). In memory a pack's config and state are its
method's dataclasses; :mod:`.header` turns them into the header's JSON and back, with the classes
the method registry gives for the pack's method name (:func:`use_method_types`).
"""
from __future__ import annotations

import contextlib
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
from typing import Any, Callable, Generic, Iterator, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ..bases.architectures import Site
from ..engine.spans import KeyRouting
from ..errors import FingerprintMismatch, GraceHooksError, PackError, PackNameError
from .adapters_dir import aside, delete_dir, locked, recover, replace_dir
from .header import (FORMAT_VERSION, BaseInfo, NoState, PackHeader, Superseded, check_header, corrupt, read_config,
                     read_state, state_json)
from .io import MAX_JSON_BYTES, MAX_TENSOR_BYTES, check_safetensors, parse_json, read_bounded
from .schema import site_tensors, split_tensor_name
from .typed import Invalid, to_json

log = logging.getLogger(__name__)

PACK_JSON = "edit_pack.json"
PACK_TENSORS = "edit_pack.safetensors"
PACK_CARD = "README.md"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
C = TypeVar("C")  # the method's config class
S = TypeVar("S")  # the method's state class
MethodTypes = Callable[[str], "tuple[type, type]"]  # method name -> (its config class, its state class)
_CONFIG_ESSENTIALS = ("model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "intermediate_size")


def validate_pack_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
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
class EditPack(Generic[C, S]):
    """The output of one ``edit()`` call with one method. Immutable once written."""

    name: str
    method: str
    config: C  # the method's typed config (an instance of its ``config_class``)
    sites: list[str]
    base: BaseInfo
    requests: list[dict[str, Any]]
    tensors: dict[str, torch.Tensor]  # keyed tensor_name(site, part)
    state: S = field(default_factory=NoState)  # the method's own small data (its ``state_class``: labels, shrinks)
    routing: KeyRouting = field(default_factory=KeyRouting)  # what its router keys stand for (requests, spans)
    metrics: dict[str, Any] = field(default_factory=dict)
    pack_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="microseconds"))
    library_version: str = ""
    supersedes: list[Superseded] = field(default_factory=list)  # earlier packs' keys that never fire while it is loaded

    @property
    def n_edits(self) -> int:
        return len(self.requests)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def site_tensors(self, site: str) -> dict[str, torch.Tensor]:
        """The tensors at ``site``, by their part names ('keys', 'U', ...)."""
        return site_tensors(self.tensors, site)

    def header(self, tensors_sha256: str = "") -> dict[str, Any]:
        """``edit_pack.json`` for this pack (format v1), as JSON values."""
        out = to_json(PackHeader(
            format_version=FORMAT_VERSION, name=self.name, pack_id=self.pack_id, method=self.method,
            method_config=to_json(self.config), sites=self.sites, base_model=self.base, created_at=self.created_at,
            library_version=self.library_version, n_edits=self.n_edits, requests=self.requests,
            state=state_json(self.state, self.routing), metrics=self.metrics, tensors_sha256=tensors_sha256,
            supersedes=self.supersedes or None,  # a pack that supersedes nothing: the header it had before the field
        ), drop_none=True)
        return out


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


def is_complete_pack(path: Path) -> bool:
    """Whether a folder holds a whole pack (its header parses and its tensors match the checksum): how
    :func:`~grace_hooks.store.adapters_dir.recover` tells a finished save from an interrupted one."""
    try:
        read_files(path)
        return True
    except PackError:
        return False


def save_pack(pack: EditPack, directory: str | Path, name: str | None = None, overwrite: bool = False) -> Path:
    """Write ``pack`` to ``directory/name`` atomically, under the folder's lock; an existing pack is
    kept unless ``overwrite``. A crash at any point leaves the old pack or the new one (see adapters_dir)."""
    name = validate_pack_name(name or pack.name)
    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in pack.tensors.items()}
    blob = st_save(tensors, metadata={"format": "grace_hooks.edit_pack", "format_version": str(FORMAT_VERSION), "method": pack.method})
    header = pack.header(hashlib.sha256(blob).hexdigest())
    with locked(directory, create=True):
        recover(directory, is_complete_pack)
        final = directory / name
        if final.exists() and not overwrite:
            raise PackError(f"a pack named {name!r} already exists in {directory}; pass overwrite=True to replace it")
        tmp = aside(final, "tmp")
        tmp.mkdir()
        try:
            _fsync_write(tmp / PACK_TENSORS, blob)
            _fsync_write(tmp / PACK_JSON, json.dumps(header, indent=1, default=str).encode())
            _fsync_write(tmp / PACK_CARD, _card(pack).encode())
            replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("saved pack %s (%d edits) to %s", name, pack.n_edits, final)
    return final


def read_header(path: str | Path) -> PackHeader:
    """Parse and check ``edit_pack.json`` (no tensors read)."""
    path = Path(path)
    jpath = path / PACK_JSON
    if path.is_symlink():
        raise PackError(f"{path} is a symbolic link; a pack must be a folder inside the adapters folder (copy it in)")
    if not jpath.exists() and not jpath.is_symlink():
        raise PackError(f"{path} is not an edit pack: {PACK_JSON} is missing (remove the folder or move it out of the "
                        "adapters folder)")
    return check_header(parse_json(read_bounded(jpath, MAX_JSON_BYTES, "pack header"), jpath), jpath)


def read_files(path: Path) -> tuple[PackHeader, dict[str, torch.Tensor]]:
    """A pack folder's header and tensors, every size, checksum and dtype checked before use."""
    header = read_header(path)
    tpath = path / PACK_TENSORS
    blob = read_bounded(tpath, MAX_TENSOR_BYTES, "pack's tensors")
    if hashlib.sha256(blob).hexdigest() != header.tensors_sha256:
        raise PackError(f"pack {path.name!r}: {PACK_TENSORS} does not match its checksum (truncated or modified)")
    check_safetensors(blob, tpath)
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError) as exc:
        raise PackError(f"pack {path.name!r}: {PACK_TENSORS} is not a valid safetensors file ({exc})") from exc
    return header, tensors


_METHOD_TYPES: list[MethodTypes] = []


def use_method_types(lookup: MethodTypes) -> None:
    """How :func:`load_pack` finds the config and state classes of a pack's method by its name. The
    method registry (a layer above the store, which names no method) sets it when it is imported."""
    _METHOD_TYPES[:] = [lookup]


def _method_types(method: str, where: Path) -> tuple[type, type]:
    if not _METHOD_TYPES:
        raise PackError(f"{where}: no edit methods are known here; import grace_hooks (or grace_hooks.methods) first")
    try:
        return _METHOD_TYPES[0](method)
    except GraceHooksError as exc:  # e.g. a method from a distribution that is not installed here
        raise PackError(f"{where}: {exc}") from None


def load_pack(path: str | Path) -> EditPack:
    """Read and validate a pack folder: its files, and its config and state as its method's classes
    (the method checks its tensors when the pack is applied). The folder name is the pack's name."""
    path = Path(path)
    name = validate_pack_name(path.name)
    header, tensors = read_files(path)
    sites = set(header.sites)
    stray = [k for k in tensors if split_tensor_name(k)[0] not in sites]
    if stray:
        raise PackError(f"pack {name!r}: tensors {stray[:3]} do not belong to any of its sites {sorted(sites)}")
    config_class, state_class = _method_types(header.method, path / PACK_JSON)
    config = read_config(config_class, header.method_config, header.method, name)
    try:
        state, routing = read_state(state_class, header.state)
    except Invalid as exc:
        raise corrupt(path / PACK_JSON, exc) from None
    return EditPack(
        name=name, method=header.method, config=config, sites=header.sites, base=header.base_model,
        requests=header.requests, tensors=tensors, state=state, routing=routing, metrics=header.metrics,
        pack_id=header.pack_id or uuid.uuid4().hex, created_at=header.created_at, library_version=header.library_version,
        supersedes=header.supersedes or [],
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
    """Pack folders in ``directory``, oldest first (by created_at, then name). Call it under the
    folder's lock. Hidden entries (leftovers of saves, the lock) are skipped; any other entry that
    is not a pack folder (a stray folder, a symlink, a folder without a readable header) is an error,
    so that nothing meant as a pack is silently left out."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        if p.name.startswith(".") or (p.is_file() and not p.is_symlink()):
            continue
        validate_pack_name(p.name)
        header = read_header(p)  # a symlink or a folder without a readable header is refused here
        found.append((header.created_at, p.name, p))
    return [p for _, _, p in sorted(found)]


@contextlib.contextmanager
def reading(directory: str | Path) -> Iterator[list[Path]]:
    """The pack folders of ``directory`` (:func:`pack_dirs`), with the folder's lock held inside the
    block, after interrupted saves were finished or undone (a read-only folder: as it is)."""
    with locked(Path(directory)) as held:
        if held:
            recover(Path(directory), is_complete_pack)
        yield pack_dirs(directory)


def list_packs(directory: str | Path) -> list[Path]:
    """:func:`pack_dirs` after interrupted saves were finished or undone."""
    with reading(directory) as paths:
        return paths


def delete_pack_dir(name: str, directory: str | Path) -> None:
    """Remove a pack folder from disk, under the folder's lock."""
    directory = Path(directory)
    with locked(directory):
        path = directory / validate_pack_name(name)
        if not path.is_dir() or path.is_symlink() or not (path / PACK_JSON).is_file():
            raise PackError(f"no pack named {name!r} in {directory}")
        delete_dir(path)
