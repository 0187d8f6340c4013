"""Hostile and broken edit packs, made by mutating real ones, and what loading one must do.

Used by the property-based test (tests/test_pack_fuzz.py, a few hundred cases), the fuzz benchmark
(benchmarks/pack_fuzz.py, 10,000) and the hostile-pack tests (:func:`read`, :func:`write`). A mutation rewrites one saved pack folder; most
rewrite the tensors and then fix the checksum, so the mutant gets past the integrity check and
reaches the schema and the runtime. :func:`outcome` loads a mutant into a model that already
holds a pack and sorts the result into

- ``rejected``: a grace_hooks error, and the model exactly as before (packs, hooks, outputs);
- ``accepted``: loaded, finite outputs, and removing it restores the earlier outputs exactly;
- ``other``: anything else (a raw exception, a half-applied load, NaN outputs...): a bug.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..bases.hooks import count_hooks
from ..errors import GraceHooksError
from ..methods import method_names
from ..model import EditableModel
from ..store.packs import PACK_JSON, PACK_TENSORS
from ..store.schema import split_tensor_name, tensor_name

PROBES = ["the capital of narnia is", "the cat sat on the mat", "the mother tongue of alice"]
OUTCOMES = ("rejected", "accepted", "other")
HEADER_FIELDS = ("format_version", "method", "method_config", "sites", "base_model", "requests", "state", "metrics",
                 "pack_id", "created_at", "n_edits", "tensors_sha256", "library_version")


def random_json(rng: random.Random, depth: int = 0):
    """A random JSON value (scalars, strings, nested lists and objects)."""
    kinds = ["none", "bool", "int", "float", "str"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, -1, 1, 2, 10**6, -(2**63), 2**64, rng.randint(-100, 100)])
    if kind == "float":
        return rng.choice([0.0, -1.5, 1e-30, 1e38, 1e300, rng.uniform(-10, 10)])
    if kind == "str":
        return rng.choice(["", "grace", "memit", "routed", "L1.mlp_out", "L99.mlp_out", "x\n", "é" * 3, "../x"])
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["a", "mode", "gate", "site", "key"]): random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))}


# ------------------------------------------------------------------ reading and writing a folder
def read(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A pack folder's header and tensors, read as they are (no check)."""
    return json.loads((folder / PACK_JSON).read_text()), st_load((folder / PACK_TENSORS).read_bytes())


def write(folder: Path, header: dict, tensors: dict[str, torch.Tensor] | None = None, blob: bytes | None = None,
          fix_checksum: bool = True) -> None:
    """Write ``header`` and the tensors (or the raw safetensors ``blob``) into a pack folder; with
    ``fix_checksum`` the header's checksum matches the new tensors, so the mutant passes that check."""
    if blob is None and tensors is not None:
        blob = st_save({k: v.contiguous() for k, v in tensors.items()})
    if blob is not None:
        (folder / PACK_TENSORS).write_bytes(blob)
        if fix_checksum:
            header["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
    (folder / PACK_JSON).write_text(json.dumps(header))


# ------------------------------------------------------------------ mutations: (rng, folder, context) -> None
def set_field(rng, folder, ctx):
    header, _ = read(folder)
    header[rng.choice(HEADER_FIELDS)] = random_json(rng)
    write(folder, header)


def drop_field(rng, folder, ctx):
    header, _ = read(folder)
    header.pop(rng.choice(HEADER_FIELDS), None)
    write(folder, header)


def relabel_method(rng, folder, ctx):
    header, _ = read(folder)
    header["method"] = rng.choice(method_names() + ["nope", ["grace"]])
    write(folder, header)


def mutate_config(rng, folder, ctx):
    header, _ = read(folder)
    cfg = header["method_config"]
    key = rng.choice(list(cfg) + ["unknown_option"])
    cfg[key] = rng.choice([random_json(rng), "routed", "global", "router", "zscore", "last", "in_scope"])
    write(folder, header)


def mutate_state(rng, folder, ctx):
    header, tensors = read(folder)
    site = rng.choice(header["sites"])
    choice = rng.randrange(3)
    if choice == 0:  # a shrink of the preloaded pack's keys, in range or not
        header["state"]["shrink"] = [{"site": site, "pack_id": ctx["preloaded_id"], "key": rng.randint(-2, 12),
                                      "radius": rng.choice([0.0, 0.5, -1.0, 1e30])}]
    elif choice == 1:
        header["state"]["labels"] = {site: random_json(rng)}
    else:
        header["state"][rng.choice(["shrink", "labels", "key_requests", "mode", "subject_spans"])] = random_json(rng)
    write(folder, header)


def mutate_sites(rng, folder, ctx):
    header, tensors = read(folder)
    old = rng.choice(header["sites"])
    new = rng.choice(["L0.mlp_out", "L3.mlp_out", "L99.mlp_out", "L-1.mlp_out", "L1.attn", "bogus", old])
    header["sites"] = [new if s == old else s for s in header["sites"]]
    if rng.random() < 0.7:  # carry the tensors along, so that the stray-tensor check does not catch it
        tensors = {_moved(k, old, new): v for k, v in tensors.items()}
    write(folder, header, tensors)


def _moved(name: str, old: str, new: str) -> str:
    """A tensor's name with its site ``old`` renamed ``new`` (a tensor of another site keeps its name)."""
    site, part = split_tensor_name(name)
    return tensor_name(new, part) if site == old else name


def _pick(rng, tensors):
    name = rng.choice(sorted(tensors))
    return name, tensors[name]


def drop_tensor(rng, folder, ctx):
    header, tensors = read(folder)
    name, _ = _pick(rng, tensors)
    del tensors[name]
    write(folder, header, tensors)


def rename_tensor(rng, folder, ctx):
    header, tensors = read(folder)
    name, t = _pick(rng, tensors)
    del tensors[name]
    site, _ = split_tensor_name(name)
    tensors[tensor_name(site, rng.choice(['U', 'V', 'keys', 'radii', 'values', 'dense', 'alpha', 'route_keys', 'route_radii', 'x']))] = t
    write(folder, header, tensors)


def reshape_tensor(rng, folder, ctx):
    header, tensors = read(folder)
    name, t = _pick(rng, tensors)
    choice = rng.randrange(5)
    if choice == 0 and t.dim() == 2:
        t = t.T.contiguous()
    elif choice == 1 and len(t):
        t = t[: rng.randint(0, len(t) - 1)]
    elif choice == 2:
        t = torch.cat([t, t[:1]]) if len(t) else t
    elif choice == 3:
        t = t.reshape(-1)
    else:
        t = t.unsqueeze(0)
    tensors[name] = t
    write(folder, header, tensors)


def collapsed(t: torch.Tensor, rank: int) -> torch.Tensor:
    """``t`` with fewer dimensions than declared: rank 0 (a scalar) or rank 1 (its first row, or flat)."""
    if rank == 0:
        return t.reshape(-1)[0].clone() if t.numel() else torch.tensor(0.0)
    return (t[0] if t.dim() > 1 and len(t) else t.reshape(-1)).clone()


def collapse_one(folder: Path, name: str, rank: int) -> None:
    """The tensor ``name`` of the pack in ``folder`` replaced by its rank-``rank`` collapse (checksum fixed)."""
    header, tensors = read(folder)
    tensors[name] = collapsed(tensors[name], rank)
    write(folder, header, tensors)


def collapse_tensor(rng, folder, ctx):
    _, tensors = read(folder)
    collapse_one(folder, rng.choice(sorted(tensors)), rng.choice([0, 1]))


def retype_tensor(rng, folder, ctx):
    header, tensors = read(folder)
    name, t = _pick(rng, tensors)
    tensors[name] = t.to(rng.choice([torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.bool, torch.uint8]))
    write(folder, header, tensors)


def poison_values(rng, folder, ctx):
    header, tensors = read(folder)
    name, t = _pick(rng, tensors)
    t = t.clone()
    if t.numel():
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), -float("inf"), 1e38, -1e38, 1e7, 3e38])
    tensors[name] = t
    write(folder, header, tensors)


def add_tensor(rng, folder, ctx):
    header, tensors = read(folder)
    site = rng.choice(header["sites"])
    tensors[tensor_name(site, rng.choice(['extra', 'U', 'dense', 'alpha', 'route_keys']))] = torch.randn(rng.randint(1, 3), 4)
    write(folder, header, tensors)


def odd_dtype(rng, folder, ctx):
    """A safetensors header entry with a dtype the safetensors reader does not know, or a bad range."""
    header, _ = read(folder)
    blob = (folder / PACK_TENSORS).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    st = json.loads(blob[8:8 + n])
    name = rng.choice([k for k in st if k != "__metadata__"])
    field, value = rng.choice([("dtype", "F8_E8M0"), ("dtype", "F4"), ("dtype", "I64"), ("dtype", "BOGUS"),
                               ("shape", [10**12]), ("shape", [-1]), ("data_offsets", [0, 10**15]), ("data_offsets", [5, 3])])
    st[name][field] = value
    text = json.dumps(st).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    write(folder, header, blob=struct.pack("<Q", len(text)) + text + blob[8 + n:])


def corrupt_bytes(rng, folder, ctx):
    header, _ = read(folder)
    blob = bytearray((folder / PACK_TENSORS).read_bytes())
    choice = rng.randrange(3)
    if choice == 0:
        blob = blob[: rng.randrange(len(blob))]
    else:
        for _ in range(rng.randint(1, 8)):
            blob[rng.randrange(min(len(blob), 200 if choice == 1 else len(blob)))] = rng.randrange(256)
    write(folder, header, blob=bytes(blob), fix_checksum=rng.random() < 0.8)


def corrupt_json(rng, folder, ctx):
    path = folder / PACK_JSON
    choice = rng.randrange(4)
    if choice == 0:
        path.write_text("[" * 1100 + "]" * 1100)
    elif choice == 1:
        text = path.read_bytes()
        path.write_bytes(text[: rng.randrange(len(text))])
    elif choice == 2:
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 64))))
    else:
        header, _ = read(folder)
        path.write_text(json.dumps(header).replace("1", "NaN", 1))


MUTATIONS = [set_field, drop_field, relabel_method, mutate_config, mutate_state, mutate_sites, drop_tensor,
             rename_tensor, reshape_tensor, collapse_tensor, retype_tensor, poison_values, add_tensor, odd_dtype, corrupt_bytes,
             corrupt_json]


# ------------------------------------------------------------------ what loading a mutant did
def _state(em: EditableModel, tokenizer):
    with torch.no_grad():
        logits = [em(**tokenizer(p, return_tensors="pt")).logits[0].clone() for p in PROBES]
    return [p.name for p in em.packs], count_hooks(em.base_model), logits


def _same(a, b) -> bool:
    return a[0] == b[0] and a[1] == b[1] and all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


def outcome(em: EditableModel, tokenizer, folder: Path, via: str = "load_pack") -> tuple[str, str]:
    """Load the mutant ``folder`` (``via`` load_pack or load_adapters of its parent) into ``em``, with
    force=True so the base check does not stop it before the schema; returns (outcome, detail)."""
    before = _state(em, tokenizer)
    try:
        if via == "load_pack":
            em.load_pack(folder, force=True)
        else:
            em.load_adapters(folder.parent, force=True)
    except GraceHooksError as exc:
        if not _same(_state(em, tokenizer), before):
            return "other", f"rejected ({type(exc).__name__}) but the model changed"
        return "rejected", type(exc).__name__
    except Exception as exc:  # noqa: BLE001 - any other exception is the bug this looks for
        return "other", f"{type(exc).__name__}: {str(exc)[:200]}"
    try:
        with torch.no_grad():
            after = _state(em, tokenizer)
            gen = em.generate(**tokenizer(PROBES[0], return_tensors="pt"), max_new_tokens=3, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)
        finite = all(bool(torch.isfinite(x).all()) for x in after[2]) and gen.shape[1] > 0
        em.remove_pack(folder.name)
    except Exception as exc:  # noqa: BLE001
        return "other", f"accepted, then {type(exc).__name__}: {str(exc)[:200]}"
    if not finite:
        return "other", "accepted with non-finite outputs"
    if not _same(_state(em, tokenizer), before):
        return "other", "accepted, but removing it did not restore the outputs"
    return "accepted", "sane"


def mutant(rng: random.Random, source: Path, workdir: Path, ctx: dict) -> tuple[Path, str]:
    """A copy of the pack folder ``source`` under ``workdir`` (alone in its folder), mutated once or twice."""
    if workdir.exists():
        shutil.rmtree(workdir)
    folder = workdir / source.name
    shutil.copytree(source, folder)
    names = []
    for _ in range(1 if rng.random() < 0.7 else 2):
        fn = rng.choice(MUTATIONS)
        names.append(fn.__name__)
        try:
            fn(rng, folder, ctx)
        except Exception:  # noqa: BLE001 - an earlier mutation broke what this one reads: keep the mutant as it is
            pass
    return folder, "+".join(names)


# ------------------------------------------------------------------ the packs mutated
SOURCES = {  # pack name -> (method, options): every method, both modes / gates
    "grace-src": ("grace", {}),
    "grace-last-src": ("grace", {"replacement": "last"}),
    "memit-global-src": ("memit", {"mode": "global"}),
    "encore-routed-src": ("encore", {"mode": "routed", "norm_lambda": 1.0}),
    "oedit-routed-src": ("oedit", {"mode": "routed"}),
    "comeba-router-src": ("comeba_hk", {"gate": "router"}),
    "comeba-zscore-src": ("comeba_hk", {"gate": "zscore", "alpha_from": "subject"}),
}


def build_sources(model, tokenizer, folder: Path, requests, delta_requests, delta_options: dict):
    """An EditableModel holding one GRACE pack ('preloaded'), and every SOURCES pack saved (not
    loaded) under ``folder``. Returns (model, {name: path}, context for the mutations)."""
    em = EditableModel(model, tokenizer, name="tiny")
    paths = {}
    for name, (method, options) in SOURCES.items():
        reqs = requests if method == "grace" else delta_requests
        em.edit(reqs, method=method, pack=name, **({} if method == "grace" else delta_options), **options)
        paths[name] = em.save_pack(name, folder)
        em.remove_pack(name)
    em.edit(requests[:1], method="grace", pack="preloaded", eps_init=50.0)  # wide keys: mutants' shrinks can hit them
    return em, paths, {"preloaded_id": em.pack("preloaded").pack_id}


__all__ = ["MUTATIONS", "OUTCOMES", "SOURCES", "build_sources", "collapse_one", "mutant", "outcome", "read", "write"]
