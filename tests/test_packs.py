"""Bad input never corrupts what is on disk, and is rejected with a clear error (invariants 5, 6)."""
import json
import os
import pickle

import pytest
import torch

from conftest import last_logits
from grace_hooks import EditableModel, EditRequest
from grace_hooks.bases.hooks import count_hooks
from grace_hooks.errors import EditRequestError, FingerprintMismatch, PackError, PackNameError
from grace_hooks.store import packs as packs_mod
from grace_hooks.store.adapters_dir import LOCK_NAME
from grace_hooks.store.packs import PACK_JSON, PACK_TENSORS, load_pack
from grace_hooks.testing import TINY_REQUESTS


@pytest.fixture
def saved(make_model, tokenizer, tmp_path):
    em = EditableModel(make_model("llama"), tokenizer, name="tiny-llama")
    em.edit(TINY_REQUESTS, method="grace", pack="facts")
    path = em.save_pack("facts", tmp_path)
    return em, path


def _fresh(make_model, tokenizer, seed=0):
    return EditableModel(make_model("llama", seed=seed), tokenizer, name=f"tiny-llama-seed{seed}")


def test_missing_safetensors(saved, make_model, tokenizer):
    _, path = saved
    (path / PACK_TENSORS).unlink()
    with pytest.raises(PackError, match="missing"):
        _fresh(make_model, tokenizer).load_pack(path)


def test_truncated_safetensors(saved, make_model, tokenizer):
    _, path = saved
    data = (path / PACK_TENSORS).read_bytes()
    (path / PACK_TENSORS).write_bytes(data[: len(data) // 2])
    em = _fresh(make_model, tokenizer)
    with pytest.raises(PackError, match="checksum"):
        em.load_pack(path)
    assert count_hooks(em.base_model) == 0 and em.packs == []


def test_pickle_in_place_of_safetensors_is_rejected(saved, make_model, tokenizer):
    _, path = saved
    blob = pickle.dumps({"x": torch.zeros(2)})
    (path / PACK_TENSORS).write_bytes(blob)
    header = json.loads((path / PACK_JSON).read_text())
    header["tensors_sha256"] = __import__("hashlib").sha256(blob).hexdigest()  # even with a matching checksum
    (path / PACK_JSON).write_text(json.dumps(header))
    with pytest.raises(PackError, match="safetensors"):
        load_pack(path)


@pytest.mark.parametrize("field,value,message", [
    ("format_version", 99, "format_version"),
    ("method", "no_such_method", "unknown edit method"),
    ("sites", ["../../etc/passwd"], "site"),
])
def test_bad_header(saved, make_model, tokenizer, field, value, message):
    _, path = saved
    header = json.loads((path / PACK_JSON).read_text())
    header[field] = value
    (path / PACK_JSON).write_text(json.dumps(header))
    with pytest.raises(Exception, match=message):
        _fresh(make_model, tokenizer).load_pack(path)


def test_corrupt_json(saved):
    _, path = saved
    (path / PACK_JSON).write_text("{not json")
    with pytest.raises(PackError, match="not valid JSON"):
        load_pack(path)


def test_fingerprint_mismatch_names_both_models_and_force_overrides(saved, make_model, tokenizer):
    _, path = saved
    other = _fresh(make_model, tokenizer, seed=1)
    with pytest.raises(FingerprintMismatch) as err:
        other.load_pack(path)
    assert "tiny-llama" in str(err.value) and "tiny-llama-seed1" in str(err.value) and "force=True" in str(err.value)
    assert count_hooks(other.base_model) == 0
    other.load_pack(path, force=True)
    assert [p.name for p in other.packs] == ["facts"]


@pytest.mark.parametrize("name", ["a/b", "..", "../x", "/abs/path", "", ".hidden", "a" * 200])
def test_bad_pack_names(saved, tmp_path, name):
    em, _ = saved
    with pytest.raises(PackNameError):
        em.save_pack(name, tmp_path) if name in [p.name for p in em.packs] else packs_mod.validate_pack_name(name)
    with pytest.raises(PackNameError):
        em.edit(TINY_REQUESTS[:1], method="grace", pack=name)


@pytest.mark.parametrize("request_, message", [
    (EditRequest(prompt="the capital of gondor is", subject="narnia", target_new="rome"), "does not occur"),
    (EditRequest(prompt="the capital of {} is", subject="narnia", target_new="  "), "empty target"),
    (EditRequest(prompt="the capital of {} is", subject="", target_new="rome"), "empty subject"),
])
def test_bad_requests(saved, request_, message):
    em, _ = saved
    with pytest.raises(EditRequestError, match=message):
        em.edit([request_], method="grace")


def test_second_save_refused_unless_overwrite(saved, tmp_path):
    em, path = saved
    before = (path / PACK_TENSORS).read_bytes()
    with pytest.raises(PackError, match="already exists"):
        em.save_pack("facts", tmp_path)
    assert (path / PACK_TENSORS).read_bytes() == before
    em.save_pack("facts", tmp_path, overwrite=True)
    assert load_pack(path).pack_id == em.pack("facts").pack_id


def test_interrupted_save_keeps_old_pack(saved, tmp_path, monkeypatch):
    em, path = saved
    before = {f: (path / f).read_bytes() for f in os.listdir(path)}

    def failing(tmp, final):  # the new pack written whole beside the old one, not yet renamed in
        assert (tmp / PACK_JSON).is_file() and final == path
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(packs_mod, "replace_dir", failing)
    with pytest.raises(KeyboardInterrupt):
        em.save_pack("facts", tmp_path, overwrite=True)
    assert {f: (path / f).read_bytes() for f in os.listdir(path)} == before
    assert sorted(os.listdir(tmp_path)) == [LOCK_NAME, "facts"]  # no temporary folder left behind


def test_unknown_config_option_is_explained(saved):
    em, _ = saved
    with pytest.raises(Exception, match="unknown option 'epsilon'.*eps_init"):
        em.edit(TINY_REQUESTS[:1], method="grace", epsilon=2.0)


def test_load_adapters_stacks_in_creation_order(saved, make_model, tokenizer, tmp_path):
    em, _ = saved
    em.edit([EditRequest(prompt="the capital of {} is", subject="narnia", target_new="london")], method="grace", pack="later")
    em.save_pack("later", tmp_path)
    expected = last_logits(em, tokenizer, ["the capital of narnia is"])[0]
    fresh = _fresh(make_model, tokenizer)
    fresh.load_adapters(tmp_path)
    assert [p.name for p in fresh.packs] == ["facts", "later"]
    assert torch.equal(last_logits(fresh, tokenizer, ["the capital of narnia is"])[0], expected)


def test_fingerprint_is_hashed_once_per_site_until_the_weight_changes(saved, make_model, tokenizer, monkeypatch):
    import grace_hooks.model as model_module

    _, path = saved
    pack = load_pack(path)
    em = EditableModel(make_model("llama"), tokenizer, name="tiny-llama")
    calls = []
    real = model_module.base_fingerprint
    monkeypatch.setattr(model_module, "base_fingerprint", lambda m, s: calls.append(s) or real(m, s))

    def add_again():  # each add checks the pack's fingerprint against the base's
        em.remove_pack("facts")
        em.add_pack(pack)

    em.add_pack(pack)
    add_again()
    assert calls == [pack.sites]
    with torch.no_grad():
        em.base_model.model.layers[1].mlp.down_proj.weight.mul_(1.0)  # an in-place write, even a no-op one
    add_again()
    assert calls == [pack.sites, pack.sites]


def test_the_committed_demo_pack_reads_with_typed_fields_and_writes_back_the_same_header():
    """A pack written before the routing fields were pack fields (tests/fixtures/demo-facts) reads into them,
    its config and state read as its method's classes, and its header is written as it was, except that
    its config now names the options it predates, with the defaults it runs with."""
    from pathlib import Path

    from grace_hooks.methods import get_method
    from grace_hooks.methods.delta.config import DeltaState, EncoreConfig

    path = Path(__file__).resolve().parent / "fixtures" / "demo-facts"
    pack = load_pack(path)
    stored = json.loads((path / PACK_JSON).read_text())
    assert pack.routing.key_requests == stored["state"]["key_requests"]
    assert pack.routing.subject_spans == stored["state"]["subject_spans"] and pack.routing.answer_spans is None
    assert pack.state == DeltaState(mode="routed", corpus=stored["state"]["corpus"])
    config = get_method(pack.method).config_of(pack)
    assert isinstance(config, EncoreConfig) and config.mode == "routed"
    read, kept = vars(config), stored["method_config"]
    assert {k: read[k] for k in kept} == kept  # what it stored reads back as stored
    assert all(read[k] == getattr(EncoreConfig(), k) for k in set(read) - set(kept))  # options it predates: defaults
    header = pack.header(stored["tensors_sha256"])
    assert header["state"] == stored["state"] and header["method_config"] == read
    assert {k: v for k, v in header.items() if k != "method_config"} == {k: v for k, v in stored.items() if k != "method_config"}


@pytest.mark.parametrize("config, message", [({"replacement": "sideways"}, "'replacement' must be one of"),
                                             ({"lr": "fast"}, "'lr'"), ({"radius": 1.0}, "unknown option 'radius'")])
def test_a_stored_config_is_read_through_the_methods_config_class(saved, tmp_path, config, message):
    """Whatever ``method_config`` a pack on disk holds is read as the method's typed config; a wrong
    option is refused before anything is applied, with what was wrong."""
    em, _ = saved
    em.edit(TINY_REQUESTS[:1], method="grace", pack="g")
    path = em.save_pack("g", tmp_path)
    header = json.loads((path / PACK_JSON).read_text())
    header["method_config"].update(config)
    (path / PACK_JSON).write_text(json.dumps(header))
    em.remove_pack("g")
    with pytest.raises(PackError, match=message):
        em.load_pack(path)
    assert [p.name for p in em.packs] == ["facts"]
