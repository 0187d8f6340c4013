"""The commands on an adapters folder: ``ls``, ``rm``, ``export`` and ``squash`` (only ``rm --request`` loads a model)."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import click

from ..bases.embedded import DEFAULT_MODEL
from ..errors import GraceHooksError
from ..store.packs import PACK_JSON, PACK_TENSORS
from .folder_ops import EXPORT_FORMATS
from .group import DEFAULT_ADAPTERS, main, print_table


def _short_time(value: Any) -> str:
    try:
        return datetime.fromisoformat(str(value)).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return str(value) or "?"


def _pack_row(path: Path, known: list[str]) -> list[str]:
    from ..store.packs import read_header

    try:
        h = read_header(path)
        # a method from another distribution that is not installed here: listed, but it will not load
        method = h.method + ("" if h.method in known else " (not installed)")
        return [path.name, method, str(len(h.requests)), ",".join(h.sites), _short_time(h.created_at), h.base_model.name]
    except (GraceHooksError, OSError) as exc:
        return [path.name, "!corrupt", "-", "-", "-", f"error: {exc}"]


@main.command("ls")
@click.option("--adapters", default=DEFAULT_ADAPTERS, show_default=True, type=click.Path(path_type=Path))
def ls_cmd(adapters: Path) -> None:
    """List the packs of ADAPTERS (headers only; no model is loaded)."""
    from ..methods import method_names
    from ..store.packs import list_packs

    if not adapters.is_dir():
        click.echo(f"no packs: {adapters} is not a directory")
        return
    try:
        paths, others = list_packs(adapters), []
    except GraceHooksError:  # a broken or foreign entry: list the pack-like ones, each with what is wrong with it
        entries = sorted(p for p in adapters.iterdir() if not p.name.startswith(".") and (p.is_dir() or p.is_symlink()))
        paths = [p for p in entries if _looks_like_pack(p)]
        others = [p.name for p in entries if not _looks_like_pack(p)]
    known = method_names()
    rows = [_pack_row(p, known) for p in paths]
    if rows:
        print_table([["NAME", "METHOD", "EDITS", "SITES", "CREATED (UTC)", "BASE MODEL"]] + rows)
    else:
        click.echo(f"no packs in {adapters}")
    _show_conflicts(paths)
    bad = sum(r[1] == "!corrupt" for r in rows)
    if bad:
        click.echo(f"{bad} pack(s) could not be read; loading this folder fails until they are mended or removed.",
                   err=True)
    if others:
        shown = ", ".join(others[:8]) + (f" and {len(others) - 8} more" if len(others) > 8 else "")
        click.echo(f"not packs (no {PACK_JSON}): {shown}. Loading the packs of {adapters} fails while these are "
                   "there: keep only packs in an adapters folder.", err=True)


def _show_conflicts(paths: list[Path]) -> None:
    """The requests of later packs that ask the same as a request of an earlier one (or of the same pack)."""
    from ..conflicts import folder_conflicts
    from ..store.packs import read_header

    packs = []
    for p in paths:
        try:
            packs.append((p.name, read_header(p).requests))
        except (GraceHooksError, KeyError, TypeError, OSError):
            continue  # listed above as corrupt
    try:
        found = folder_conflicts(packs)
    except GraceHooksError as exc:  # a request that is not one: the pack is refused on load anyway
        click.echo(f"conflicts not checked: {exc}", err=True)
        return
    if found:
        click.echo(f"\n{len(found)} conflicting request(s) (same subject, and the same prompt or relation; both act):")
        for newer, c in found:
            click.echo(f"  {newer}#{c.request} {c.subject!r} -> {c.target!r}  vs  {c.pack}#{c.earlier} -> "
                       f"{c.earlier_target!r} ({c.why})")


def _looks_like_pack(path: Path) -> bool:
    """A folder meant as a pack holds a pack file, readable or not; anything else is not a pack at all."""
    return (path / PACK_JSON).exists() or (path / PACK_TENSORS).exists()


@main.command("rm")
@click.argument("name")
@click.option("--adapters", default=DEFAULT_ADAPTERS, show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--request", "request", type=click.IntRange(min=0), default=None,
              help="Remove only this request (its index in the pack, 0 first) and keep the rest: loads the model.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="The base the folder's packs were made on (--request).")
def rm_cmd(name: str, adapters: Path, request: int | None, model: str) -> None:
    """Delete pack NAME from ADAPTERS (its folder), or with --request one of its requests (a new
    version of the pack replaces it, saved as safely as any save)."""
    from ..model import EditableModel

    if request is None:
        EditableModel.delete_pack(name, adapters)
        click.echo(f"removed pack {name} from {adapters}")
        return
    from .group import load_model

    em = load_model(model, adapters)
    try:
        target = em.pack(name).requests[request] if request < em.pack(name).n_edits else {}
        info = em.remove_request(name, request)
        em.save_pack(name, adapters, overwrite=True)
    finally:
        em.close()
    click.echo(f"removed request {request} ({target.get('prompt', '')!r} about {target.get('subject', '')!r} -> "
               f"{target.get('target_new', '')!r}) from pack {name}: {info.n_edits} request(s) left")


@main.command("export")
@click.argument("name")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--adapters", default=DEFAULT_ADAPTERS, show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default="native", show_default=True,
              help="native: the pack folder as is; peft: a PEFT adapter (weight-delta packs only).")
def export_cmd(name: str, dest: Path, adapters: Path, fmt: str) -> None:
    """Copy pack NAME into folder DEST, as DEST/NAME (DEST is made when missing)."""
    from .folder_ops import export_pack

    target = export_pack(name, adapters, dest, fmt)
    if fmt == "peft":
        click.echo(f"exported pack {name} as a PEFT LoRA adapter to {target}")
    else:
        click.echo(f"exported pack {name} ({fmt}) to {target}")


@main.command("squash")
@click.argument("names", nargs=-1, required=True)
@click.option("--into", required=True, help="Name of the merged pack (may be one of NAMES).")
@click.option("--adapters", default=DEFAULT_ADAPTERS, show_default=True, type=click.Path(file_okay=False, path_type=Path))
def squash_cmd(names: tuple[str, ...], into: str, adapters: Path) -> None:
    """Merge the chain of packs NAMES (oldest first) into one pack INTO with the same outputs, in
    place of them (methods that can squash: comeba_hk, and routed memit, encore and oedit)."""
    from .folder_ops import squash_in_folder

    done = squash_in_folder(list(names), into, adapters)
    click.echo(f"squashed {done.n_packs} packs ({done.n_edits} edits) into {done.name}: "
               f"{done.bytes_before:,} -> {done.bytes_after:,} bytes")

