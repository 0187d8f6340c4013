"""What a benchmark records about the run itself: machine, code version, sizes, summary stats."""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np


def median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def p90(xs) -> float:
    return float(np.percentile(xs, 90)) if len(xs) else float("nan")


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def versions() -> dict:
    """Versions of the code behind a figure: this library and the packages its numbers depend on
    (torch for the arithmetic, transformers for the models, faiss for the router's index)."""
    import torch
    import transformers

    from ..version import __version__

    try:  # optional for a caller that never routes; None says it was absent, not unknown
        import faiss
        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = None
    return {"grace_hooks": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "faiss": faiss_version}


def _hardware(threads: int | None) -> dict:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads_used": threads, "memory_gib": mem, "platform": platform.platform(), "python": platform.python_version(),
        "device": "cpu",
    }


def machine_info(threads: int) -> dict:
    """The machine and the package versions (the lifelong benchmark's ``machine`` record)."""
    return {**_hardware(threads), **versions()}


def git_info(repo: Path) -> dict:
    def run(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    # A dirty tree's commit does not describe the code that ran: name the files that differed
    # (porcelain lines are "XY path"), so a reader can tell whether they could matter.
    changed = [line[3:] for line in run("status", "--porcelain").splitlines() if line.strip()]
    # ... and fingerprint the uncommitted changes, so two dirty runs can be told apart (or matched)
    diff = run("diff", "HEAD") if changed else ""
    return {"commit": run("rev-parse", "HEAD").strip() or None, "dirty": bool(changed), "dirty_files": changed,
            "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None}


def run_record(repo: Path, threads: int | None = None) -> dict:
    """Everything a results file needs to say which code, on which machine, under which load made it.

    The one place benchmarks take this from (``result["run"] = run_record(REPO, args.threads)``), so
    every JSON records the same fields. Call it after ``torch.set_num_threads``: ``torch_threads``
    is read from torch, not taken from the caller, so it is what the run actually used
    (``machine.threads_used`` is what the caller asked for, None if it did not say).
    """
    import torch

    rec = {
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv else [],
        "git": git_info(repo),
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": None,
        "loadavg_start": loadavg(),
        "machine": _hardware(threads),
    }
    with contextlib.suppress(ImportError, AttributeError):
        import faiss
        rec["faiss_threads"] = faiss.omp_get_max_threads()
    return rec


def dir_bytes(path: Path) -> dict:
    by_kind: dict[str, int] = {}
    for f in path.rglob("*") if path.is_dir() else []:
        if f.is_file():
            by_kind[f.name] = by_kind.get(f.name, 0) + f.stat().st_size
    return {"total": sum(by_kind.values()), "by_file_name": by_kind}


def replace_md_section(path: Path, heading: str, body: str) -> None:
    """Put ``heading`` + ``body`` into a markdown file, replacing that section if present."""
    section = heading + "\n\n" + body.rstrip("\n") + "\n"
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmark results\n"
    if heading in old:
        head, rest = old.split(heading, 1)
        nxt = rest.find("\n## ")
        tail = rest[nxt + 1:] if nxt >= 0 else ""
        new = head + section + ("\n" + tail if tail else "")
    else:
        new = old.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new, encoding="utf-8")
