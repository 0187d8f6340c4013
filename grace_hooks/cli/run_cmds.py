"""The commands that run for long: ``serve`` (the OpenAI-compatible server) and ``eval`` (the
lifelong-editing benchmark)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..bases.embedded import DEFAULT_MODEL
from ..eval.lifelong import LifelongConfig
from .group import DEFAULT_ADAPTERS, busy, main


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
        from ..serve import ServeConfig, serve as run
    except ImportError as exc:
        raise click.ClickException(f"grace-hooks serve needs the serve extra ({exc}): pip install 'grace_hooks[serve]'")
    config = ServeConfig(api_key=api_key or None, model_id=model, max_tokens=max_tokens, watch_s=watch_s,
                         max_body_bytes=max_body_bytes, max_edit_requests=max_edit_requests, max_waiting=max_waiting)
    busy(f"loading model {model}{' twice (a copy to compute edits on)' if side_copy else ''} ...")
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
    from ..eval.bench import run_benchmark
    from ..eval.report import final_rows, table

    cfg = LifelongConfig(**settings)
    out = out or Path("results") / f"{data.stem}-n{cfg.n_records}-b{cfg.batch}"
    command = "grace-hooks eval " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["eval"] else " ".join(sys.argv)
    busy(f"lifelong benchmark: {', '.join(specs)} on {cfg.n_records} records of {data}, batch {cfg.batch} -> {out}")
    results = run_benchmark(model, data, specs, out, cfg, threads=threads, command=command)
    click.echo(table(final_rows(results)))
    click.echo(f"\nwrote {out / 'results.json'}, {out / 'results.md'} and plots")

