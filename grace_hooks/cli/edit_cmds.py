"""The commands that edit and ask: ``demo``, ``edit`` (and whether each edit took), ``methods``,
``ask``, ``why``, ``rebase`` and ``model-path``."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import click

from ..bases.embedded import DEFAULT_MODEL
from ..config import DEFAULT_METHOD
from ..errors import PackError
from .group import DEFAULT_ADAPTERS, busy, load_model, main, print_table

log = logging.getLogger(__name__)


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
@click.option("--supersede", is_flag=True,
              help="Loaded requests these conflict with (same subject and prompt or relation) stop acting while the new "
                   "pack is loaded; removing it brings them back.")
def edit(requests_file: Path, method: str, adapters: Path, pack_name: str | None, model: str, limit: int | None,
         sets: tuple[str, ...], overwrite: bool, supersede: bool) -> None:
    """Compute an edit pack from a requests file and save it into ADAPTERS."""
    from ..bases.embedded import edit_defaults
    from ..config import make_config
    from ..methods import get_method
    from ..requests import read_requests
    from ..store.packs import validate_pack_name
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

    em = load_model(model, adapters if adapters.is_dir() else None, skip=pack_name if existing else None)
    try:
        t0 = time.perf_counter()
        busy(f"editing {len(reqs)} request(s) with {method} ...")
        info = em.edit(reqs, method=method, pack=pack_name, supersede=supersede, **overrides)
        busy(f"edited in {time.perf_counter() - t0:.1f} s")
        path = em.save_pack(info.name, adapters, overwrite=overwrite)
        metrics = em.pack(info.name).metrics
        busy("checking each edit: the greedy answer of its prompt, with every loaded pack acting ...")
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
    _show_took(took, method, cfg, info.name, adapters, info.conflicts)


def _parse_sets(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected key=value, got {item!r}", param_hint="'--set'")
        out[key.strip()] = value.strip()
    return out


def _cut(text: str, width: int) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[:width - 3] + "..."


def _show_took(took, method: str, cfg, pack: str, adapters: Path, conflicts=()) -> None:
    """Per request: did the new target become the greedy answer, and which loaded request it conflicts
    with? Then, if some did not take, what to try."""
    clash: dict[int, list[str]] = {}
    for c in conflicts:
        clash.setdefault(c.request, []).append(f"{c.pack}#{c.earlier} ({_cut(c.earlier_target, 16)})")
    rows = [["TOOK", "PROMPT", "TARGET", "ANSWER NOW"] + (["CONFLICTS WITH"] if clash else [])]
    rows += [["yes" if t.took else "no", _cut(t.prompt, 60), _cut(t.target, 24), _cut(t.answer.strip(), 24) or "(nothing)"]
             + ([", ".join(clash.get(i, [])) or "-"] if clash else []) for i, t in enumerate(took)]
    click.echo("\ndid each edit take? (the greedy answer of its prompt, now)")
    print_table(rows, indent="  ")
    if clash:
        click.echo(f"{len(clash)} request(s) ask the same as a request already loaded (same subject, and the same prompt "
                   "or relation): both edits now act on those inputs (docs/usage.md#conflicting-edits).")
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
    from ..config import option_lines
    from ..methods import get_method, method_names

    for name in method_names():
        click.echo(f"{name}:")
        for line in option_lines(get_method(name).config_class):
            click.echo(f"  {line}")


# ---------------------------------------------------------------------------- rebase
@main.command()
@click.option("--adapters", required=True, type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="The adapters folder whose packs are recomputed.")
@click.option("--model", required=True, help="The new base: hub id, folder, .gguf or embedded name.")
def rebase(adapters: Path, model: str) -> None:
    """Recompute every pack of ADAPTERS on a new base MODEL from its stored requests and options, oldest
    first; switch the folder over only when all are done (the old one is kept beside it)."""
    from .rebase import rebase_adapters

    em = load_model(model)
    try:
        rows, old = rebase_adapters(adapters, em, progress=lambda r: busy(
            f"{r.name}: {r.landed}/{r.requests} requests landed ({r.method}, {r.seconds:.1f} s)"))
    finally:
        em.close()
    print_table([["pack", "method", "landed", "seconds"]]
                + [[r.name, r.method, f"{r.landed}/{r.requests}", f"{r.seconds:.1f}"] for r in rows])
    click.echo(f"{adapters} now holds the rebased packs; the old ones are in {old} (remove it when you no longer "
               "need it).")
    missed = sum(r.requests - r.landed for r in rows)
    if missed:
        click.echo(f"{missed} request(s) did not land on the new base: check them with grace-hooks ask, or edit "
                   "them again with other options.")


# ---------------------------------------------------------------------------- ask
def asking(command):
    """The arguments ``ask`` and ``why`` share: the prompt, the model, the adapters folder, the answer's length."""
    for option in reversed((click.argument("prompt"),
                            click.option("--model", default=DEFAULT_MODEL, show_default=True,
                                         help="Base model: hub id, folder, .gguf or embedded name."),
                            click.option("--adapters", default=DEFAULT_ADAPTERS, show_default=True,
                                         type=click.Path(file_okay=False, path_type=Path),
                                         help="Folder of packs to apply; a folder given here must exist (the default "
                                              "one is skipped with a note)."),
                            click.option("--max-new-tokens", type=click.IntRange(min=1), default=20, show_default=True))):
        command = option(command)
    return command


@main.command()
@asking
@click.option("--no-edits", is_flag=True, help="Answer with the base model only (no packs).")
@click.pass_context
def ask(ctx: click.Context, prompt: str, model: str, adapters: Path, no_edits: bool, max_new_tokens: int) -> None:
    """Greedy continuation of PROMPT (with the packs of ADAPTERS unless --no-edits)."""
    from .demo import greedy

    em = load_model(model, None if no_edits else _adapters_to_use(ctx, adapters, "answering with the base model"))
    try:
        click.echo(greedy(em, prompt, max_new_tokens))
    finally:
        em.close()


def _adapters_to_use(ctx: click.Context, adapters: Path, without: str) -> Path | None:
    """``adapters`` when it is a folder; None (with a note saying ``without``) for the default folder
    missing; an error for a folder the user named that is not there (a typo, not a wish for the base)."""
    if adapters.is_dir():
        return adapters
    if ctx.get_parameter_source("adapters") is not click.core.ParameterSource.DEFAULT:
        raise PackError(f"adapters folder {str(adapters)!r} does not exist; check the path, or pass --no-edits "
                        "to ask the base model")
    busy(f"note: {adapters} does not exist; {without}")
    return None


# ---------------------------------------------------------------------------- why
@main.command()
@asking
@click.option("--chat", is_flag=True, help="Ask PROMPT as one user turn of the chat template (as a chat user asks).")
@click.option("--json", "as_json", is_flag=True, help="Print the explanation as JSON.")
@click.pass_context
def why(ctx: click.Context, prompt: str, model: str, adapters: Path, chat: bool, max_new_tokens: int,
        as_json: bool) -> None:
    """Why the answer to PROMPT is what it is: per generated token, the packs that acted (site, input
    position, router key, the requests it serves), and the answer with each acting pack left out."""
    import json

    from ..eval.chat import explain_asked

    em = load_model(model, _adapters_to_use(ctx, adapters, "no pack can act"))
    try:
        explanation = explain_asked(em, prompt, chat, max_new_tokens)
    finally:
        em.close()
    if as_json:
        click.echo(json.dumps(explanation.to_dict(), indent=1))
    else:
        click.echo("\n".join(explanation.lines()))


@main.command("model-path")
@click.argument("model", default=DEFAULT_MODEL)
def model_path(model: str) -> None:
    """Print the plain Hugging Face base of MODEL, for other libraries (PEFT, vLLM): an embedded short
    name's converted folder (made on first use), a folder's absolute path, or the hub id as given."""
    from ..bases.embedded import EMBEDDED
    from ..bases.loading import embedded_model_dir, hf_reference

    if model in EMBEDDED:
        embedded_model_dir(model)
    click.echo(hf_reference(model))

