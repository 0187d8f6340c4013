"""Reading a pack's files defensively: sizes are checked before anything is read, JSON and the
safetensors header are parsed with their limits, and every error is a :class:`PackError` that says
which file was wrong and what to do.

The safetensors header is checked here, before ``safetensors`` sees the bytes: only float dtypes
are accepted (an unknown dtype such as ``F8_E8M0`` makes the reader raise a raw ``KeyError``), and
every tensor's byte range must match its shape and lie inside the file, with nothing after the last.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from ..errors import PackError

MAX_JSON_BYTES = 64 * 2**20
MAX_TENSOR_BYTES = 4 * 2**30  # a pack larger than this is refused before it is read
MAX_SAFETENSORS_HEADER = 16 * 2**20
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}  # what packs store: every tensor is a float


def read_bounded(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file (no symlink) of at most ``limit`` bytes, checked before reading."""
    if path.is_symlink():
        raise PackError(f"{path} is a symbolic link; a pack's files must be regular files inside its folder "
                        "(copy the file in instead of linking it)")
    if not path.is_file():
        raise PackError(f"{path} is missing; the {what} is incomplete")
    size = path.stat().st_size
    if size > limit:
        raise PackError(f"{path} is {size} bytes, over the {limit}-byte limit for a {what}; refusing to read it "
                        "(a pack this large is corrupt or not a grace_hooks pack)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PackError(f"{path} cannot be read ({exc.strerror}); check its permissions") from exc
    if len(data) != size:
        raise PackError(f"{path} changed while it was read; retry when no other process writes it")
    return data


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(data: bytes, where: Path) -> Any:
    """JSON text to Python values; NaN / Infinity and nesting too deep for the parser are refused."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise PackError(f"{where} nests too deeply to be a pack header; the file is corrupt or hostile") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise PackError(f"{where} is not valid JSON ({exc}); the pack is corrupt") from None


def check_safetensors(blob: bytes, where: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors file (name -> dtype, shape, data_offsets), checked."""
    if len(blob) < 8:
        raise PackError(f"{where} is too short to be a safetensors file; the pack is truncated")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > min(MAX_SAFETENSORS_HEADER, len(blob) - 8):
        raise PackError(f"{where}: its header claims {n} bytes, more than the file holds; the pack is truncated or corrupt")
    header = parse_json(blob[8:8 + n], where)
    if not isinstance(header, dict):
        raise PackError(f"{where}: the safetensors header must be a JSON object")
    header.pop("__metadata__", None)
    data_len, ends = len(blob) - 8 - n, []
    for name, entry in header.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and isinstance(entry.get("shape"), list)
                and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
                and all(type(v) is int and v >= 0 for v in entry["shape"] + entry["data_offsets"])):
            raise PackError(f"{where}: tensor {name!r} has a malformed header entry")
        if entry["dtype"] not in FLOAT_DTYPES:
            raise PackError(f"{where}: tensor {name!r} has dtype {entry['dtype']}; packs hold only "
                            f"{sorted(FLOAT_DTYPES)} tensors")
        start, end = entry["data_offsets"]
        if end - start != math.prod(entry["shape"]) * FLOAT_DTYPES[entry["dtype"]] or end > data_len:
            raise PackError(f"{where}: tensor {name!r} claims bytes {start}..{end} of {data_len}, which do not fit its "
                            "shape or the file; the pack is truncated or corrupt")
        ends.append((start, end))
    covered = 0
    for start, end in sorted(ends):  # the byte ranges tile the data section exactly
        if start != covered:
            raise PackError(f"{where}: tensor data overlaps or leaves gaps; the pack is corrupt")
        covered = end
    if covered != data_len:
        raise PackError(f"{where}: {data_len - covered} bytes after the last tensor; the pack is corrupt")
    return header


__all__ = ["FLOAT_DTYPES", "MAX_JSON_BYTES", "MAX_TENSOR_BYTES", "check_safetensors", "parse_json", "read_bounded"]
