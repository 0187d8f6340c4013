"""What the command line does to the packs of an adapters folder without loading a model: copy a
pack out (as it is, or as a PEFT adapter) and squash a chain of packs into one, in place."""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import PackError
from ..methods import get_method
from ..store.adapters_dir import write_new_dir
from ..store.packs import delete_pack_dir, list_packs, load_pack, save_pack, validate_pack_name

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("native", "peft")


def export_pack(name: str, adapters: str | Path, dest: str | Path, fmt: str = "native") -> Path:
    """Copy pack ``name`` of ``adapters`` into the folder ``dest``, always as ``dest/name`` (made when
    missing): ``native``, the pack folder as it is; ``peft``, a PEFT LoRA adapter (packs whose every
    effect has a LoRA form). The pack is read and checked first; the copy appears whole or not at all."""
    if fmt not in EXPORT_FORMATS:
        raise PackError(f"unknown export format {fmt!r}; formats: {EXPORT_FORMATS}")
    adapters, dest = Path(adapters), Path(dest)
    src = adapters / validate_pack_name(name)
    if not src.is_dir():
        raise PackError(f"no pack named {name!r} in {adapters}")
    if dest.exists() and not dest.is_dir():
        raise PackError(f"{dest} is a file; DEST is the folder the pack is written into (as DEST/{name})")
    pack = load_pack(src)  # refuses a corrupt or truncated pack before anything is copied
    target = dest / name  # the same layout whether DEST exists yet or not
    if fmt == "peft":
        from .export import export_peft

        return export_peft(pack, target)
    if target.exists():
        raise PackError(f"{target} already exists; remove it or choose another destination")
    if target.resolve() == src.resolve():
        raise PackError(f"{target} is the pack itself")
    return write_new_dir(target, lambda tmp: shutil.copytree(src, tmp))


@dataclass(frozen=True)
class Squashed:
    name: str
    n_packs: int
    n_edits: int
    bytes_before: int
    bytes_after: int


def squash_in_folder(names: list[str], into: str, adapters: str | Path) -> Squashed:
    """Replace the chain of packs ``names`` (oldest first, as the folder orders them) in ``adapters``
    by one pack ``into`` with the same outputs (methods that can squash). The merged pack is saved
    before any pack of the chain is deleted."""
    adapters, names = Path(adapters), list(names)
    into = validate_pack_name(into)
    for n in names:
        if not (adapters / validate_pack_name(n)).is_dir():
            raise PackError(f"no pack named {n!r} in {adapters}")
    order = [p.name for p in list_packs(adapters) if p.name in set(names)]
    if order != names or len(set(names)) != len(names):
        raise PackError(f"give the chain oldest first, each pack once: {order}")
    if into not in names and (adapters / into).exists():
        raise PackError(f"{adapters / into} already exists; choose another name for the merged pack")
    packs = [load_pack(adapters / n) for n in names]
    merged = get_method(packs[0].method).squash(packs, into)
    save_pack(merged, adapters, name=into, overwrite=into in names)
    for n in names:
        if n != into:
            delete_pack_dir(n, adapters)
    log.info("squashed %d packs of %s into %s", len(names), adapters, into)
    return Squashed(into, len(names), merged.n_edits, sum(p.nbytes for p in packs), merged.nbytes)


__all__ = ["EXPORT_FORMATS", "Squashed", "export_pack", "squash_in_folder"]
