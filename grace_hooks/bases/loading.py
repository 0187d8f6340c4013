"""Resolving a base model: hub id, local folder, GGUF file, embedded short name, or a loaded model.

Embedded models (:mod:`grace_hooks.bases.embedded`: GGUF files carried by PyPI wheels, checked against pinned
hashes) are de-quantised once into a cached float32 safetensors folder that records which GGUF file it
came from; later loads read that folder (seconds).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from ..errors import GraceHooksError
from .embedded import EMBEDDED, cache_dir, fetch_gguf

log = logging.getLogger(__name__)

SOURCE_FILE = "grace_hooks_source.json"  # in a converted folder: the sha256 of the GGUF file it was made from


def convert_gguf(gguf_path: Path, out_dir: Path, size_hint: str = "", source_sha256: str | None = None) -> Path:
    """De-quantise a GGUF file into a float32 safetensors folder (atomically); ``source_sha256``, the
    GGUF file's verified hash, is recorded in the folder."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a float32 safetensors folder%s in %s (once; later loads read that folder) ...",
             gguf_path.name, size_hint, out_dir)
    start = time.perf_counter()
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
        if source_sha256:
            (tmp / SOURCE_FILE).write_text(json.dumps({"gguf_file": gguf_path.name, "gguf_sha256": source_sha256}))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - start)
    return out_dir


def embedded_folder(name: str) -> Path:
    """Where the plain Hugging Face folder of embedded model ``name`` lives (made or not)."""
    return cache_dir() / "models" / name


def converted_from(folder: Path) -> str | None:
    """The sha256 of the GGUF file a converted folder was made from (None: not recorded, or unreadable)."""
    try:
        return json.loads((folder / SOURCE_FILE).read_text())["gguf_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def embedded_model_dir(name: str) -> Path:
    """The cached safetensors folder of an embedded model, made on first use from its verified GGUF file.
    A folder not recorded as made from the pinned file (made before pins, or from another file) is made again."""
    spec = EMBEDDED[name]
    folder = embedded_folder(name)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        if converted_from(folder) == spec.gguf_sha256:
            return folder
        log.warning("%s was not made from the pinned GGUF file of %s (sha256 %s...); converting it again",
                    folder, name, spec.gguf_sha256[:12])
    return convert_gguf(fetch_gguf(spec), folder, size_hint=f" (about {spec.folder_mb} MB)", source_sha256=spec.gguf_sha256)


def hf_reference(name: str) -> str:
    """What another library (PEFT, vLLM) should load as the base model called ``name`` here: the
    converted folder of an embedded short name (which only this library knows), an existing local
    folder as an absolute path (a relative one would depend on the reader's working directory),
    else ``name`` itself (a hub id). A GGUF file stays as it is: loading it needs ``gguf_file=``."""
    if name in EMBEDDED:
        return str(embedded_folder(name).resolve())
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return name


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
