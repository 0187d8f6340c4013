"""One benchmark run: load the model and the data once, run every method spec, write the results.

``<out>/results.json`` (every metric at every checkpoint, the configs, the model, the data file
and its hash, the library version, timings), ``<out>/results.md`` and the PNG plots; each spec
works in ``<out>/<label>/`` (its packs, its resumable state).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from ..bases.embedded import sha256_of
from ..model import EditableModel
from ..requests import read_requests
from ..version import __version__
from .editors import MethodSpec
from .lifelong import BaseReference, LifelongConfig, LifelongRun
from .report import markdown, plots
from .runinfo import git_info, loadavg, machine_info

log = logging.getLogger(__name__)


def set_threads(threads: int) -> None:
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def run_benchmark(model: str | EditableModel, data: str | Path, specs: Sequence[str], out: str | Path,
                  cfg: LifelongConfig | None = None, threads: int | None = 1, command: str = "",
                  progress: bool = True, repo: Path | None = None) -> dict[str, Any]:
    cfg = cfg or LifelongConfig()
    out, data = Path(out), Path(data)
    if threads:
        set_threads(threads)
    parsed = [MethodSpec.parse(s) for s in specs]
    requests = read_requests(data, limit=cfg.offset + cfg.n_records)[cfg.offset:]
    own = not isinstance(model, EditableModel)
    em = EditableModel.from_pretrained(model) if own else model
    code = git_info(repo or Path.cwd())  # this process's code (meta["git"] becomes the first process's on resume)
    meta = {
        "model": em.name, "data": str(data), "data_sha256": sha256_of(data), "n_records": cfg.n_records,
        "batch": cfg.batch, "library_version": __version__, "command": command,
        "machine": machine_info(threads or 0), "git": code,
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "loadavg_start": loadavg(),
    }
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"meta": meta, "config": asdict(cfg), "runs": {}}
    finished = _continue(results, out / "results.json")
    if finished is not None:  # from the start: a run stopped before any spec finished keeps its provenance
        results["runs"].update(finished)
        _write_json(results, out)
    finished = finished or {}
    base = BaseReference()  # shared: every spec runs on the same base
    try:
        for spec in parsed:
            if spec.label in finished:  # its figures stay those of the process that measured them
                log.info("%s: finished in an earlier process; kept its results", spec.label)
                continue
            run = LifelongRun(em, requests, spec, cfg, out / spec.label, base,
                              meta={"model": meta["model"], "data_sha256": meta["data_sha256"], "git": code})
            results["runs"][spec.label] = run.run(progress=progress)
            write_outputs(results, out)
    finally:
        if own:
            em.close()
    meta.update(finished_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), loadavg_end=loadavg())
    write_outputs(results, out)
    return results


def _continue(results: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """The finished specs of an earlier process on the same folder and settings (a resumed run);
    None when the folder holds another run's results (left as they are: LifelongRun then refuses
    that run's states with a clear error).

    The run keeps the first process's start and commit; each later one is listed in
    ``meta["resumed"]`` (when, which commit, the load), so the results say what made them.
    """
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text(encoding="utf-8"))
    meta, first = results["meta"], earlier.get("meta", {})
    if earlier.get("config") != results["config"] or first.get("data_sha256") != meta["data_sha256"]:
        return None
    resumed = first.get("resumed", []) + [{k: meta[k] for k in ("started_at", "git", "loadavg_start")}]
    meta.update(started_at=first.get("started_at"), git=first.get("git"), resumed=resumed)
    n = results["config"]["n_records"]
    return {label: run for label, run in earlier.get("runs", {}).items()
            if run.get("checkpoints") and run["checkpoints"][-1]["edits"] == n}


def _write_json(results: dict[str, Any], out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")


def write_outputs(results: dict[str, Any], out: Path) -> None:
    _write_json(results, out)
    (out / "results.md").write_text(markdown(results), encoding="utf-8")
    plots(results, out)
