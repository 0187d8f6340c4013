"""``grace-hooks``: the command line. Output for people is printed here; the library only logs.

Every :class:`~grace_hooks.errors.GraceHooksError` is shown as ``error: <message>`` with exit
code 2 (no traceback).
"""
from __future__ import annotations

import logging
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from .config import DEFAULT_METHOD
from .errors import GraceHooksError, PackError
from .eval.lifelong import LifelongConfig
from .folder_ops import EXPORT_FORMATS
from .embedded import DEFAULT_MODEL
from .packs import PACK_JSON, PACK_TENSORS

log = logging.getLogger(__name__)

DEFAULT_ADAPTERS = "adapters"


class _Group(click.Group):
    """Turns the library's own errors into ``error: ...`` and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GraceHooksError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)


def _busy(message: str) -> None:
    """A line on stderr so a person knows long work is under way."""
    click.echo(message, err=True)


def _parse_sets(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected key=value, got {item!r}", param_hint="'--set'")
        out[key.strip()] = value.strip()
    return out


def _load(model: str, adapters: Path | None = None, skip: str | None = None):
    """Load ``model`` with the packs of ``adapters`` (oldest first), leaving out pack ``skip``."""
    from .model import EditableModel

    t0 = time.perf_counter()
    _busy(f"loading model {model} ...")
    em = EditableModel.from_pretrained(model)
    try:
        if adapters is not None:
            em.load_adapters(adapters, exclude=[skip] if skip else ())
    except BaseException:
        em.close()
        raise
    packs = [p.name for p in em.packs]
    _busy(f"loaded in {time.perf_counter() - t0:.1f} s" + (f" with {len(packs)} pack(s): {', '.join(packs)}" if packs else ""))
    return em


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True,
              help="Log lines with their level and source, and third-party warnings and progress bars.")
def main(verbose: bool) -> None:
    """Non-destructive knowledge editing of Hugging Face LMs with edit packs."""
    from . import cli_logging

    cli_logging.setup(verbose)


# ---------------------------------------------------------------------------- demo
@main.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Base model: hub id, folder, .gguf or embedded name.")
@click.option("--adapters", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Folder the demo pack is written to  [default: <cache>/demo/adapters, outside any checkout]")
@click.option("--requests", "requests_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Edit requests (JSON/JSONL, any supported layout); default: the four shipped facts.")
@click.option("--method", default=DEFAULT_METHOD, show_default=True, help="Edit method (see `grace-hooks methods`).")
def demo(model: str, adapters: Path | None, requests_file: Path | None, method: str) -> None:
    """Edit facts, save them as pack 'demo-facts', reload, roll back."""
    from .demo import run_demo

    summary = run_demo(model=model, adapters=adapters, requests=requests_file, echo=click.echo, method=method)
    if summary["success"] < summary["total"] or not summary["identical"]:
        log.warning("demo: %d/%d edits reached their target; rollback identical: %s",
                    summary["success"], summary["total"], summary["identical"])


# ---------------------------------------------------------------------------- edit
@main.command()
@click.option("--requests", "requests_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSON list or JSON lines: native, CounterFact (EasyEdit), ROME or zsRE (MEND) layout.")
@click.option("--method", default=DEFAULT_METHOD, show_default=True, help="Edit method (see `grace-hooks methods`).")
@click.option("--adapters", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder of packs: its packs are loaded first, the new pack is saved there.")
@click.option("--pack", "pack_name", default=None, help="Name of the new pack (default: <method>-<UTC time>).")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Base model: hub id, folder, .gguf or embedded name.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N requests.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Method config override (repeatable), e.g. --set eps_init=2.")
@click.option("--overwrite", is_flag=True, help="Replace a pack of the same name in the adapters folder.")
def edit(requests_file: Path, method: str, adapters: Path, pack_name: str | None, model: str, limit: int | None,
         sets: tuple[str, ...], overwrite: bool) -> None:
    """Compute an edit pack from a requests file and save it into ADAPTERS."""
    from .config import make_config
    from .embedded import edit_defaults
    from .methods import get_method
    from .packs import validate_pack_name
    from .requests import read_requests
    from .took import check_took

    # Cheap checks first: nothing slow happens before the inputs are known to be usable.
    overrides = _parse_sets(sets)
    impl = get_method(method)
    cfg = make_config(impl.config_class, overrides, base=edit_defaults(model, impl.config_class))  # as em.edit makes it
    if pack_name is not None:
        validate_pack_name(pack_name)
    if adapters.exists() and not adapters.is_dir():
        raise PackError(f"adapters path {str(adapters)!r} exists and is not a directory")
    existing = pack_name is not None and (adapters / pack_name).exists()
    if existing and not overwrite:
        raise PackError(f"a pack named {pack_name!r} already exists in {adapters}; pass --overwrite to replace it")
    reqs = read_requests(requests_file, limit=limit)
    if not reqs:
        raise PackError(f"{requests_file} holds no edit requests")

    em = _load(model, adapters if adapters.is_dir() else None, skip=pack_name if existing else None)
    try:
        t0 = time.perf_counter()
        _busy(f"editing {len(reqs)} request(s) with {method} ...")
        info = em.edit(reqs, method=method, pack=pack_name, **overrides)
        _busy(f"edited in {time.perf_counter() - t0:.1f} s")
        path = em.save_pack(info.name, adapters, overwrite=overwrite)
        metrics = em.pack(info.name).metrics
        _busy("checking each edit: the greedy answer of its prompt, with every loaded pack acting ...")
        took = check_took(em, reqs)
    finally:
        em.close()
    click.echo(f"pack:    {info.name}")
    click.echo(f"path:    {path}")
    click.echo(f"method:  {info.method}")
    click.echo(f"edits:   {info.n_edits}")
    click.echo(f"bytes:   {info.nbytes}")
    click.echo(f"sites:   {', '.join(info.sites)}")
    click.echo("metrics:")
    for line in _flatten(metrics):
        click.echo(f"  {line}")
    _show_took(took, method, cfg, info.name, adapters)


def _cut(text: str, width: int) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[:width - 3] + "..."


def _show_took(took, method: str, cfg, pack: str, adapters: Path) -> None:
    """Per request: did the new target become the greedy answer? Then, if some did not, what to try."""
    rows = [["TOOK", "PROMPT", "TARGET", "ANSWER NOW"]]
    rows += [["yes" if t.took else "no", _cut(t.prompt, 60), _cut(t.target, 24), _cut(t.answer.strip(), 24) or "(nothing)"]
             for t in took]
    click.echo("\ndid each edit take? (the greedy answer of its prompt, now)")
    _table(rows, indent="  ")
    missed = [t for t in took if not t.took]
    if not missed:
        click.echo(f"all {len(took)} edit(s) took.")
        return
    click.echo(f"{len(missed)} of {len(took)} edit(s) did NOT take: the model still answers otherwise. The pack was saved "
               f"with every request (grace-hooks rm {pack} --adapters {adapters} removes it). To try:")
    knob = next((k for k in ("steps", "n_iter") if hasattr(cfg, k)), None)
    if knob:
        now = getattr(cfg, knob)
        click.echo(f"  - more optimisation: --set {knob}={max(2 * now, 10)} (now {now})")
    other = "grace" if method != "grace" else DEFAULT_METHOD
    click.echo(f"  - another method: --method {other} (`grace-hooks methods` lists them)")
    click.echo("  - a smaller batch: fewer requests per edit (--limit N, or split the requests file)")


def _flatten(d: dict, prefix: str = "") -> list[str]:
    lines = []
    for k, v in d.items():
        if isinstance(v, dict):
            lines += _flatten(v, f"{prefix}{k}.")
        elif isinstance(v, float):
            lines.append(f"{prefix}{k}: {v:.4g}")
        else:
            lines.append(f"{prefix}{k}: {v}")
    return lines


@main.command()
def methods() -> None:
    """List the edit methods and their options."""
    from .config import option_lines
    from .methods import get_method, method_names

    for name in method_names():
        click.echo(f"{name}:")
        for line in option_lines(get_method(name).config_class):
            click.echo(f"  {line}")


# ---------------------------------------------------------------------------- ls / rm / export
def _short_time(value: Any) -> str:
    try:
        return datetime.fromisoformat(str(value)).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return str(value) or "?"


def _pack_row(path: Path, known: list[str]) -> list[str]:
    from .packs import read_header

    try:
        h = read_header(path)
        base = h["base_model"] if isinstance(h["base_model"], dict) else {}
        n_edits = h.get("n_edits", len(h["requests"]) if isinstance(h["requests"], list) else "?")
        # a method from another distribution that is not installed here: listed, but it will not load
        method = str(h["method"]) + ("" if h["method"] in known else " (not installed)")
        return [path.name, method, str(n_edits), ",".join(h["sites"]), _short_time(h.get("created_at", "")),
                str(base.get("name", "?"))]
    except (GraceHooksError, KeyError, TypeError, AttributeError, OSError) as exc:
        return [path.name, "!corrupt", "-", "-", "-", f"error: {exc}"]


@main.command("ls")
@click.option("--adapters", default=DEFAULT_ADAPTERS, show_default=True, type=click.Path(path_type=Path))
def ls_cmd(adapters: Path) -> None:
    """List the packs of ADAPTERS (headers only; no model is loaded)."""
    from .methods import method_names
    from .packs import list_packs

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
        _table([["NAME", "METHOD", "EDITS", "SITES", "CREATED (UTC)", "BASE MODEL"]] + rows)
    else:
        click.echo(f"no packs in {adapters}")
    bad = sum(r[1] == "!corrupt" for r in rows)
    if bad:
        click.echo(f"{bad} pack(s) could not be read; loading this folder fails until they are mended or removed.",
                   err=True)
    if others:
        shown = ", ".join(others[:8]) + (f" and {len(others) - 8} more" if len(others) > 8 else "")
        click.echo(f"not packs (no {PACK_JSON}): {shown}. Loading the packs of {adapters} fails while these are "
                   "there: keep only packs in an adapters folder.", err=True)


def _looks_like_pack(path: Path) -> bool:
    """A folder meant as a pack holds a pack file, readable or not; anything else is not a pack at all."""
    return (path / PACK_JSON).exists() or (path / PACK_TENSORS).exists()


def _table(rows: list[list[str]], indent: str = "") -> None:
    """Columns padded to their widest cell; the last column is left ragged (it may be long)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])


@main.command("rm")
@click.argument("name")
@click.option("--adapters", default=DEFAULT_ADAPTERS, show_default=True, type=click.Path(file_okay=False, path_type=Path))
def rm_cmd(name: str, adapters: Path) -> None:
    """Delete pack NAME from ADAPTERS (its folder)."""
    from .model import EditableModel

    EditableModel.delete_pack(name, adapters)
    click.echo(f"removed pack {name} from {adapters}")


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
    place of them (methods that can squash: comeba_hk)."""
    from .folder_ops import squash_in_folder

    done = squash_in_folder(list(names), into, adapters)
    click.echo(f"squashed {done.n_packs} packs ({done.n_edits} edits) into {done.name}: "
               f"{done.bytes_before:,} -> {done.bytes_after:,} bytes")


# ---------------------------------------------------------------------------- ask
@main.command()
@click.argument("prompt")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Base model: hub id, folder, .gguf or embedded name.")
@click.option("--adapters", default=DEFAULT_ADAPTERS, show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder of packs to apply; a folder given here must exist (the default one is skipped with a note).")
@click.option("--no-edits", is_flag=True, help="Answer with the base model only (no packs).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=20, show_default=True)
@click.pass_context
def ask(ctx: click.Context, prompt: str, model: str, adapters: Path, no_edits: bool, max_new_tokens: int) -> None:
    """Greedy continuation of PROMPT (with the packs of ADAPTERS unless --no-edits)."""
    from .demo import greedy

    use = None
    if not no_edits:
        if adapters.is_dir():
            use = adapters
        elif ctx.get_parameter_source("adapters") is not click.core.ParameterSource.DEFAULT:
            # A folder the user named but that is not there is a typo, not a wish for the bare base model.
            raise PackError(f"adapters folder {str(adapters)!r} does not exist; check the path, or pass --no-edits "
                            "to ask the base model")
        else:
            _busy(f"note: {adapters} does not exist; answering with the base model")
    em = _load(model, use)
    try:
        click.echo(greedy(em, prompt, max_new_tokens))
    finally:
        em.close()


@main.command("model-path")
@click.argument("model", default=DEFAULT_MODEL)
def model_path(model: str) -> None:
    """Print the plain Hugging Face base of MODEL, for other libraries (PEFT, vLLM): an embedded short
    name's converted folder (made on first use), a folder's absolute path, or the hub id as given."""
    from .embedded import EMBEDDED
    from .loading import embedded_model_dir, hf_reference

    if model in EMBEDDED:
        embedded_model_dir(model)
    click.echo(hf_reference(model))


# ---------------------------------------------------------------------------- serve
@main.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Base model: hub id, folder, .gguf or embedded name.")
@click.option("--adapters", default=DEFAULT_ADAPTERS, show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder of packs: loaded at start, new packs saved there, changes by other processes picked up.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (localhost only by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="GRACE_HOOKS_API_KEY", default=None, show_envvar=True,
              help="Key that POST/DELETE /v1/packs need (Authorization: Bearer KEY); reads stay open.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True, help="Most tokens one answer may ask for.")
@click.option("--watch", "watch_s", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Seconds between checks of the adapters folder for other processes' changes (0: never).")
@click.option("--side-copy/--no-side-copy", default=True, show_default=True,
              help="Compute new packs on a second copy of the model so answers go on meanwhile (twice the memory).")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=1 << 20, show_default=True,
              help="Largest request body; a larger one gets a 413 before it is read.")
@click.option("--max-edit-requests", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Most edit requests in one POST /v1/packs (split larger edits into several packs).")
@click.option("--max-waiting", type=click.IntRange(min=0), default=16, show_default=True,
              help="Requests that may wait for the model (generations and pack changes, each); more get a 503.")
def serve(model: str, adapters: Path, host: str, port: int, api_key: str | None, max_tokens: int, watch_s: float,
          side_copy: bool, max_body_bytes: int, max_edit_requests: int, max_waiting: int) -> None:
    """OpenAI-compatible server (/v1/chat/completions, /v1/completions) with the packs of ADAPTERS
    applied; /v1/packs adds and rolls back packs while it runs. Needs grace_hooks[serve]."""
    try:
        from .serve import ServeConfig, serve as run
    except ImportError as exc:
        raise click.ClickException(f"grace-hooks serve needs the serve extra ({exc}): pip install 'grace_hooks[serve]'")
    config = ServeConfig(api_key=api_key or None, model_id=model, max_tokens=max_tokens, watch_s=watch_s,
                         max_body_bytes=max_body_bytes, max_edit_requests=max_edit_requests, max_waiting=max_waiting)
    _busy(f"loading model {model}{' twice (a copy to compute edits on)' if side_copy else ''} ...")
    run(model, adapters, host=host, port=port, config=config, side_copy=side_copy)


# ---------------------------------------------------------------------------- eval
def _dataclass_options(cls):
    """One ``--field-name`` option per field of a config dataclass, with its default and help."""
    import dataclasses

    def decorate(fn):
        for f in reversed(dataclasses.fields(cls)):
            flag = f"--{f.name.replace('_', '-')}"
            if isinstance(f.default, bool):  # --x / --no-x: a setting on by default can be turned off
                flag, kind = f"{flag}/--no-{flag[2:]}", {}
            else:
                kind = {"type": type(f.default)}
            fn = click.option(flag, f.name, default=f.default, show_default=True, help=f.metadata.get("help"), **kind)(fn)
        return fn

    return decorate


@main.command("eval")
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Edit records: CounterFact (EasyEdit or ROME layout) or zsRE (MEND layout).")
@click.option("--method", "specs", multiple=True, default=("grace",), show_default=True,
              help="Method spec NAME[:KEY=VALUE,...] (repeatable): any edit method, or the baselines 'none' and 'ft'.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Base model: hub id, folder, .gguf or embedded name.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Results folder; default results/<data>-n<N>-b<B>. Rerunning with the same settings resumes.")
@click.option("--threads", default=1, show_default=True, help="torch/FAISS threads (1 avoids thrashing on shared cores).")
@_dataclass_options(LifelongConfig)
def eval_cmd(data: Path, specs: tuple[str, ...], model: str, out: Path | None, threads: int, **settings) -> None:
    """Lifelong-editing benchmark: edit a stream of records in batches, measure at checkpoints."""
    from .eval.bench import run_benchmark
    from .eval.report import final_rows, table

    cfg = LifelongConfig(**settings)
    out = out or Path("results") / f"{data.stem}-n{cfg.n_records}-b{cfg.batch}"
    command = "grace-hooks eval " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["eval"] else " ".join(sys.argv)
    _busy(f"lifelong benchmark: {', '.join(specs)} on {cfg.n_records} records of {data}, batch {cfg.batch} -> {out}")
    results = run_benchmark(model, data, specs, out, cfg, threads=threads, command=command)
    click.echo(table(final_rows(results)))
    click.echo(f"\nwrote {out / 'results.json'}, {out / 'results.md'} and plots")


if __name__ == "__main__":  # last: every command above is registered by now
    main()
