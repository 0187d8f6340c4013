"""Each defect class of hostile or broken packs gets a clean error, and a failed load changes
nothing (invariants 6 and 8). The property-based sweep is tests/test_pack_fuzz.py."""
import json
import os
import shutil
import struct

import pytest
import torch

from conftest import last_logits
from grace_hooks import EditableModel
from grace_hooks.bases.hooks import count_hooks
from grace_hooks.engine.runtime import SiteRuntime
from grace_hooks.errors import EditError, PackError, PackNameError
from grace_hooks.store.packs import PACK_JSON, PACK_TENSORS, load_pack
from grace_hooks.testing import DELTA_REQUESTS, DELTA_TINY, TINY_REQUESTS
from grace_hooks.testing.pack_mutations import read, write

PROBES = [r.text for r in TINY_REQUESTS] + ["the cat sat on the mat"]


@pytest.fixture
def em(make_model, tokenizer):
    """A model that already holds one pack, so a failed load must leave an edited model as it was."""
    model = EditableModel(make_model("llama"), tokenizer, name="tiny")
    model.edit(TINY_REQUESTS[:1], method="grace", pack="first", eps_init=50.0)
    return model


def _save(em, tmp_path, method, name, **options):
    reqs = TINY_REQUESTS if method == "grace" else DELTA_REQUESTS
    em.edit(reqs, method=method, pack=name, **({} if method == "grace" else DELTA_TINY), **options)
    path = em.save_pack(name, tmp_path / "packs")
    em.remove_pack(name)
    return path


def _snapshot(em, tokenizer):
    return [p.name for p in em.packs], count_hooks(em.base_model), last_logits(em, tokenizer, PROBES)


def _assert_unchanged(em, tokenizer, before):
    names, hooks, logits = _snapshot(em, tokenizer)
    assert (names, hooks) == before[:2]
    assert all(torch.equal(a, b) for a, b in zip(logits, before[2]))


def _rejects(em, tokenizer, path, match, loader="load_pack"):
    before = _snapshot(em, tokenizer)
    with pytest.raises(PackError, match=match):
        em.load_pack(path, force=True) if loader == "load_pack" else em.load_adapters(path, force=True)
    _assert_unchanged(em, tokenizer, before)


def _edit_header(path, **fields):
    header, _ = read(path)
    header.update(fields)
    write(path, header)


# ---------------------------------------------------------------------------- schema against the method
def test_grace_pack_relabelled_memit_names_the_missing_tensors(em, tokenizer, tmp_path):
    path = _save(em, tmp_path, "grace", "g")
    header, _ = read(path)
    header["method"], header["method_config"] = "memit", {"mode": "global"}
    write(path, header)
    _rejects(em, tokenizer, path, r"missing tensors \['U', 'V', 'keys'\]|missing tensors \['U', 'V'\]")


def test_global_delta_pack_claiming_routed_mode(em, tokenizer, tmp_path):
    path = _save(em, tmp_path, "memit", "d", mode="global")
    header, _ = read(path)
    header["method_config"]["mode"] = "routed"
    write(path, header)
    _rejects(em, tokenizer, path, r"missing tensors \['route_radii'\]")  # router keys may be the edit keys; radii never


@pytest.mark.parametrize("field,value,match", [
    ("method", ["grace"], "'method' must be a method name"),
    ("method_config", [], "'method_config' must be an object"),
    ("requests", 0, "'requests' must be a list"),
    ("sites", [], "'sites' must be a non-empty list"),
    ("state", "x", "'state' must be an object"),
    ("pack_id", "../../x", "'pack_id' must be"),
    ("method_config", {"eps_init": "wide"}, "not a valid grace config"),
    ("method_config", {"eps_init": [1]}, "not a valid grace config"),
    ("method_config", {"replacement": "sometimes"}, "not a valid grace config"),
])
def test_header_fields_of_the_wrong_type(em, tokenizer, tmp_path, field, value, match):
    path = _save(em, tmp_path, "grace", "g")
    _edit_header(path, **{field: value})
    _rejects(em, tokenizer, path, match)


def test_out_of_range_shrink_key_index_is_refused_before_anything_is_applied(em, tokenizer, tmp_path):
    path = _save(em, tmp_path, "grace", "g")
    header, _ = read(path)
    header["state"]["shrink"] = [{"site": header["sites"][0], "pack_id": em.pack("first").pack_id, "key": 7, "radius": 0.1}]
    write(path, header)
    _rejects(em, tokenizer, path, "shrinks key 7 of an earlier pack")
    assert [p.name for p in em.packs] == ["first"]  # the listing still works


@pytest.mark.parametrize("tensor,change,match", [
    ("keys", lambda t: t[:, :-1], r"keys has size 127 on axis 1 \(d_in\); expected 128"),
    ("values", lambda t: t.T.contiguous(), "values has"),
    ("radii", lambda t: t[:1], "radii has size 1 on axis 0"),
    ("values", lambda t: torch.full_like(t, float("nan")), "NaN or infinite"),
    ("radii", lambda t: torch.full_like(t, 1e38), r"beyond \+-1e\+06"),
    ("keys", lambda t: t.to(torch.int32), "not a float dtype|dtype I32"),
])
def test_bad_tensors_in_a_grace_pack(em, tokenizer, tmp_path, tensor, change, match):
    path = _save(em, tmp_path, "grace", "g")
    header, tensors = read(path)
    name = f"{header['sites'][0]}/{tensor}"
    tensors[name] = change(tensors[name])
    write(path, header, tensors)
    _rejects(em, tokenizer, path, match)


def test_routed_pack_with_bad_route_keys_at_its_third_site_changes_nothing(em, tokenizer, tmp_path):
    path = _save(em, tmp_path, "memit", "d", mode="routed", layers="0-2", scope="key")  # router keys of their own
    header, tensors = read(path)
    name = f"{header['sites'][2]}/route_keys"
    tensors[name] = tensors[name][:, :-3]
    write(path, header, tensors)
    _rejects(em, tokenizer, path, "route_keys has size 125 on axis 1")


def test_span_pack_whose_radii_do_not_match_its_keys_changes_nothing(em, tokenizer, tmp_path):
    """Scope 'span' routes by the edit keys (no route_keys stored): one radius per key, or refused."""
    path = _save(em, tmp_path, "memit", "d", mode="routed", layers="0-2")
    header, tensors = read(path)
    assert f"{header['sites'][2]}/route_keys" not in tensors
    name = f"{header['sites'][2]}/route_radii"
    tensors[name] = tensors[name][:-1]
    write(path, header, tensors)
    _rejects(em, tokenizer, path, "route_radii has size")


@pytest.mark.parametrize("method", ["memit", "grace"])
@pytest.mark.parametrize("spans, match", [("drop a request", "subject_spans"), ("negative id", "subject_spans"),
                                          ("not a list", "subject_spans")])
def test_bad_subject_spans_are_refused(em, tokenizer, tmp_path, method, spans, match):
    path = _save(em, tmp_path, method, "s", **({"mode": "routed", "layers": "0-2"} if method == "memit" else {}))
    header, _ = read(path)
    good = header["state"]["subject_spans"]
    header["state"]["subject_spans"] = {"drop a request": good[:-1], "negative id": [[[-1]]] + good[1:],
                                        "not a list": "alice"}[spans]
    write(path, header)
    _rejects(em, tokenizer, path, match)


def test_a_site_that_fails_while_applied_is_rolled_back(em, tokenizer, tmp_path, monkeypatch):
    """Loading is a transaction even past validation: a failure at the third site undoes the first two."""
    path = _save(em, tmp_path, "memit", "d", mode="routed", layers="0-2")
    real_add, calls = SiteRuntime.add, []

    def failing(self, pack_id, rank, c):
        calls.append(self.site.name)
        if len(calls) == 3:
            raise PackError("simulated failure at the third site")
        real_add(self, pack_id, rank, c)

    monkeypatch.setattr(SiteRuntime, "add", failing)
    _rejects(em, tokenizer, path, "simulated failure")
    assert len(calls) == 3


def test_non_finite_edit_fails_cleanly_and_is_not_applied(em, tokenizer, monkeypatch):
    from grace_hooks.methods.grace.method import Grace

    real = Grace.compute

    def poisoned(self, ctx, requests, cfg):
        out = real(self, ctx, requests, cfg)
        for k in out.tensors:
            if k.endswith("/values"):
                out.tensors[k] = torch.full_like(out.tensors[k], float("inf"))
        return out

    monkeypatch.setattr(Grace, "compute", poisoned)
    before = _snapshot(em, tokenizer)
    with pytest.raises(EditError, match="not applied.*NaN or infinite"):
        em.edit(TINY_REQUESTS[1:2], method="grace", pack="bad")
    _assert_unchanged(em, tokenizer, before)


# ---------------------------------------------------------------------------- the files themselves
def test_unknown_safetensors_dtype_is_a_pack_error(em, tokenizer, tmp_path):
    path = _save(em, tmp_path, "grace", "g")
    header, _ = read(path)
    blob = (path / PACK_TENSORS).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    st = json.loads(blob[8:8 + n])
    name = next(k for k in st if k != "__metadata__")
    st[name]["dtype"] = "F8_E8M0"
    text = json.dumps(st).encode()
    write(path, header, blob=struct.pack("<Q", len(text)) + text + blob[8 + n:])
    _rejects(em, tokenizer, path, "dtype F8_E8M0")


def test_json_nested_too_deep_is_a_pack_error(em, tokenizer, tmp_path):
    path = _save(em, tmp_path, "grace", "g")
    (path / PACK_JSON).write_text("[" * 1100 + "]" * 1100)
    _rejects(em, tokenizer, path, "nests too deeply|must hold a JSON object")


@pytest.mark.parametrize("which", [PACK_TENSORS, PACK_JSON])
def test_huge_sparse_file_is_refused_before_it_is_read(em, tokenizer, tmp_path, which, monkeypatch):
    path = _save(em, tmp_path, "grace", "g")
    with open(path / which, "r+b") as fh:
        fh.truncate(6 * 2**30)  # sparse: no disk used, but reading it whole would need 6 GiB
    real = type(path).read_bytes
    monkeypatch.setattr(type(path), "read_bytes", lambda self: pytest.fail(f"{which} was read") if self.name == which else real(self))
    _rejects(em, tokenizer, path, "over the .*-byte limit")


def test_copied_pack_folder_is_refused(em, tokenizer, tmp_path):
    path = _save(em, tmp_path, "grace", "g")
    shutil.copytree(path, path.parent / "g-copy")
    before = _snapshot(em, tokenizer)
    with pytest.raises(PackError, match="same pack_id"):
        em.load_adapters(path.parent)
    _assert_unchanged(em, tokenizer, before)  # all or nothing: 'g' is not left loaded either


def test_symlinks_out_of_the_adapters_folder_are_refused(em, tokenizer, tmp_path):
    path = _save(em, tmp_path, "grace", "g")
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    os.symlink(path, adapters / "linked")
    _rejects(em, tokenizer, adapters, "symbolic link", loader="load_adapters")
    os.unlink(adapters / "linked")
    (adapters / "g").mkdir()
    shutil.copy(path / PACK_JSON, adapters / "g" / PACK_JSON)
    os.symlink(path / PACK_TENSORS, adapters / "g" / PACK_TENSORS)
    _rejects(em, tokenizer, adapters, "symbolic link", loader="load_adapters")


def test_folder_without_a_header_is_not_skipped_silently(em, tokenizer, tmp_path):
    path = _save(em, tmp_path, "grace", "g")
    (path.parent / "half").mkdir()
    _rejects(em, tokenizer, path.parent, "edit_pack.json is missing", loader="load_adapters")


def test_unreadable_header_is_an_error(em, tokenizer, tmp_path, monkeypatch):
    path = _save(em, tmp_path, "grace", "g")
    real = type(path).read_bytes

    def denied(self):
        if self.name == PACK_JSON:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(type(path), "read_bytes", denied)
    _rejects(em, tokenizer, path.parent, "cannot be read .*Permission denied", loader="load_adapters")


@pytest.mark.parametrize("name", ["pack\n", "pack\r", "pack name", "päck"])
def test_pack_names_with_odd_characters_are_refused(tmp_path, name):
    (tmp_path / name).mkdir()
    with pytest.raises(PackNameError):
        load_pack(tmp_path / name)
