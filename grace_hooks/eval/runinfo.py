"""What a benchmark records about the run itself: machine, code version, sizes, summary stats."""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import resource
import statistics
import subprocess
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


def machine_info(threads: int) -> dict:
    import torch
    import transformers

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
        "torch": torch.__version__, "transformers": transformers.__version__, "device": "cpu",
    }


def git_info(repo: Path) -> dict:
    def run(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": run("rev-parse", "HEAD") or None, "dirty": bool(run("status", "--porcelain"))}


def dir_bytes(path: Path) -> dict:
    by_kind: dict[str, int] = {}
    for f in path.rglob("*") if path.is_dir() else []:
        if f.is_file():
            by_kind[f.name] = by_kind.get(f.name, 0) + f.stat().st_size
    return {"total": sum(by_kind.values()), "by_file_name": by_kind}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
