"""The pack header's declared schema, the typed config and state of each method, and the names of a
pack's tensors (issue 36, typed pack fields). No model is loaded: packs are built in memory."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from grace_hooks.engine.spans import KeyRouting
from grace_hooks.errors import ConfigError, PackError
from grace_hooks.method_kit import EditMethod, register
from grace_hooks.methods import method_class, method_names
from grace_hooks.methods.delta.config import DeltaState, EncoreConfig
from grace_hooks.methods.grace.config import GraceConfig, GraceState, Shrink
from grace_hooks.methods.registry import pack_types
from grace_hooks.store.header import (FIX, FORMAT_VERSION, BaseInfo, NoState, check_header, read_config, read_state,
                                      state_json)
from grace_hooks.store.packs import PACK_JSON, EditPack, load_pack, save_pack
from grace_hooks.store.schema import named, site_tensors, split_tensor_name, tensor_name
from grace_hooks.store.typed import Invalid, from_json, to_json

DEMO = Path(__file__).resolve().parent / "fixtures" / "demo-facts"
WHERE = Path("/adapters/p") / PACK_JSON


def _demo_header() -> dict:
    return json.loads((DEMO / PACK_JSON).read_text())


# ---------------------------------------------------------------------------- the header's schema
@pytest.mark.parametrize("field, value, message", [
    ("name", 5, "'name' must be a string"),
    ("pack_id", "../../x", "'pack_id' must be 1-64 letters, digits or '-'"),
    ("pack_id", 7, "'pack_id' must be 1-64 letters, digits or '-'"),
    ("method", ["grace"], "'method' must be a method name (a string)"),
    ("method_config", [], "'method_config' must be an object of options"),
    ("sites", [], "'sites' must be a non-empty list of distinct site names"),
    ("sites", ["L3.mlp_out", "L3.mlp_out"], "'sites' must be a non-empty list of distinct site names"),
    ("sites", "L3.mlp_out", "'sites' must be a non-empty list of distinct site names"),
    ("sites", [3], "'sites[0]' must be a string"),
    ("sites", ["../../etc/passwd"], "'sites' has a bad site name '../../etc/passwd': expected 'L<layer>.<point>', e.g. 'L22.mlp_out'"),
    ("base_model", "smollm2", "'base_model' must be an object giving name, model_type and fingerprint as strings"),
    ("base_model", {"name": "m", "model_type": "llama"}, "'base_model' lacks required fields ['fingerprint']"),
    ("base_model", {"name": "m", "model_type": "llama", "fingerprint": 1}, "'base_model.fingerprint' must be a string"),
    ("created_at", 1.5, "'created_at' must be a string"),
    ("library_version", None, "'library_version' must be a string"),
    ("n_edits", "4", "'n_edits' must be an integer or null"),
    ("n_edits", True, "'n_edits' must be an integer or null"),
    ("requests", 0, "'requests' must be a list of edit-request objects"),
    ("requests", [["prompt"]], "'requests[0]' must be an object"),
    ("state", "x", "'state' must be an object"),
    ("metrics", [], "'metrics' must be an object"),
    ("tensors_sha256", None, "'tensors_sha256' must be a hex string (the checksum of edit_pack.safetensors)"),
])
def test_each_bad_header_field_is_named_with_what_it_must_be(field, value, message):
    header = _demo_header()
    header[field] = value
    with pytest.raises(PackError) as err:
        check_header(header, WHERE)
    assert str(err.value) == f"{WHERE}: {message}; {FIX}"


def test_missing_fields_are_listed_together_and_unknown_ones_ignored():
    header = _demo_header()
    for field in ("method", "sites", "tensors_sha256"):
        del header[field]
    with pytest.raises(PackError, match=r"edit_pack.json: lacks required fields \['method', 'sites', 'tensors_sha256'\]"):
        check_header(header, WHERE)
    assert check_header(_demo_header() | {"written_by_a_later_version": [1]}, WHERE).method == "encore"


@pytest.mark.parametrize("raw, message", [([], "must hold a JSON object"), ({"format_version": 2}, "format_version 2"),
                                          ({"format_version": "1"}, "format_version '1'")])
def test_a_header_that_is_no_v1_object_is_refused_before_its_fields(raw, message):
    with pytest.raises(PackError, match=message):
        check_header(raw, WHERE)


def test_the_checked_header_is_typed():
    header = check_header(_demo_header(), WHERE)
    assert header.format_version == FORMAT_VERSION and header.n_edits == len(header.requests) == 4
    assert header.base_model == BaseInfo("smollm2-135m", "llama", "b85a9b053b44884109b4d8e3f45378df")
    assert to_json(header, drop_none=True) == _demo_header()  # and written back field for field, in the same order
    assert list(to_json(header, drop_none=True)) == list(_demo_header())


# ---------------------------------------------------------------------------- the method's parts
ROUTING = KeyRouting(key_requests={"L3.mlp_out": [[0], [1, 2]]}, subject_spans=[[[5, 6]], [[7]], [[8], [9, 10]]])


@pytest.mark.parametrize("state", [
    GraceState(labels={"L3.mlp_out": ["rome", "paris"]}, shrink=[Shrink("L3.mlp_out", "abc-1", 2, 0.25)]),
    GraceState(),
    DeltaState(mode="routed", corpus={"L3.mlp_out": "model-sampled:seed=0"}),
    DeltaState(),
    NoState(),
])
@pytest.mark.parametrize("routing", [ROUTING, KeyRouting()])
def test_state_and_routing_round_trip_through_the_header_state(state, routing):
    data = json.loads(json.dumps(state_json(state, routing)))
    assert all(v is not None for v in data.values())  # a field left at None is left out, and reads back as None
    assert read_state(type(state), data) == (state, routing)


@pytest.mark.parametrize("method", ["grace", "memit", "encore", "oedit", "comeba_hk"])
def test_every_methods_config_round_trips_through_json(method):
    config_class, state_class = pack_types(method)
    config = config_class()
    stored = json.loads(json.dumps(to_json(config)))
    assert stored == vars(config) and read_config(config_class, stored, method, "p") == config
    assert read_state(state_class, {}) == (state_class(), KeyRouting())  # an older pack without the entries


@pytest.mark.parametrize("cls, data, message", [
    (GraceState, {"shrink": [{"site": "L3.mlp_out", "pack_id": "a", "key": -1, "radius": 0.5}]},
     "'state.shrink[0].key' must be a key index >= 0"),
    (GraceState, {"shrink": [{"site": "L3.mlp_out", "pack_id": "a", "key": 1, "radius": 1e30}]},
     "'state.shrink[0].radius' must be a number within +-1e+06"),
    (GraceState, {"shrink": [{"site": "L3.mlp_out", "key": 1, "radius": 0.5}]},
     "'state.shrink[0]' lacks required fields ['pack_id']"),
    (GraceState, {"labels": {"L3.mlp_out": "rome"}}, "'state.labels['L3.mlp_out']' must be a list of strings"),
    (GraceState, {"labels": {"L3.mlp_out": ["rome", 3]}}, "'state.labels['L3.mlp_out'][1]' must be a string"),
    (DeltaState, {"corpus": ["c0"]}, "'state.corpus' must be an object or null"),
    (NoState, {"key_requests": {"L3.mlp_out": [["0"]]}}, "'state.key_requests['L3.mlp_out'][0][0]' must be an integer"),
    (NoState, {"subject_spans": "alice"}, "'state.subject_spans' must be a list of lists or null"),
])
def test_a_bad_state_entry_is_named_by_its_path(cls, data, message):
    with pytest.raises(Invalid) as err:
        read_state(cls, data)
    assert str(err.value) == message


def test_ints_read_as_floats_and_no_bool_as_a_number():
    assert from_json(Shrink, {"site": "s", "pack_id": "p", "key": 1, "radius": 2}).radius == 2.0
    with pytest.raises(Invalid, match="'key' must be a key index"):
        from_json(Shrink, {"site": "s", "pack_id": "p", "key": True, "radius": 2})


# ---------------------------------------------------------------------------- packs on disk
def _grace_pack(**fields) -> EditPack:
    site = "L1.mlp_out"
    tensors = named({site: {"keys": torch.randn(2, 64), "radii": torch.ones(2), "values": torch.randn(2, 64)}})
    return EditPack(**{"name": "g", "method": "grace", "config": GraceConfig(eps_init=2.5), "sites": [site],
                       "base": BaseInfo("tiny", "llama", "f" * 32), "requests": [{"prompt": "a {}", "subject": "b",
                                                                                 "target_new": "c"}] * 2,
                       "tensors": tensors, "routing": KeyRouting(key_requests={site: [[0], [1]]}),
                       "state": GraceState(labels={site: ["c", "c"]}, shrink=[Shrink(site, "earlier", 0, 0.5)])} | fields)


def test_a_pack_saved_and_loaded_keeps_its_typed_parts_and_the_v1_layout(tmp_path):
    pack = _grace_pack()
    path = save_pack(pack, tmp_path)
    header = json.loads((path / PACK_JSON).read_text())
    assert header["format_version"] == 1 and header["method_config"] == vars(pack.config)
    assert header["state"] == {"labels": {"L1.mlp_out": ["c", "c"]},  # routing inside state, as format v1 keeps it
                               "shrink": [{"site": "L1.mlp_out", "pack_id": "earlier", "key": 0, "radius": 0.5}],
                               "key_requests": {"L1.mlp_out": [[0], [1]]}}
    again = load_pack(path)
    assert (again.config, again.state, again.routing) == (pack.config, pack.state, pack.routing)
    assert again.tensors.keys() == pack.tensors.keys()
    assert all(torch.equal(again.tensors[k], t) for k, t in pack.tensors.items())


def test_an_older_v1_header_without_the_optional_fields_loads(tmp_path):
    """The oldest v1 headers: no name, pack_id, created_at, n_edits or metrics, a state without the
    delta's entries, and a config with an option retired since (at the value that runs now)."""
    path = tmp_path / "old-facts"
    shutil.copytree(DEMO, path)
    header = _demo_header()
    for field in ("name", "pack_id", "created_at", "n_edits", "metrics"):
        del header[field]
    header["state"] = {k: header["state"][k] for k in ("key_requests", "subject_spans")}
    header["method_config"]["z_through_norm"] = False
    (path / PACK_JSON).write_text(json.dumps(header))
    pack = load_pack(path)
    assert pack.name == "old-facts" and len(pack.pack_id) == 32 and pack.metrics == {} and pack.n_edits == 4
    assert pack.state == DeltaState() and pack.routing.subject_spans == header["state"]["subject_spans"]
    assert isinstance(pack.config, EncoreConfig) and not hasattr(pack.config, "z_through_norm")
    assert pack.header()["state"] == header["state"]  # nothing is added to what it stored


def test_a_pack_of_a_method_not_installed_here_is_refused_as_a_pack_error(tmp_path):
    path = tmp_path / "p"
    shutil.copytree(DEMO, path)
    header = _demo_header() | {"method": "no_such_method"}
    (path / PACK_JSON).write_text(json.dumps(header))
    with pytest.raises(PackError, match="unknown edit method 'no_such_method'"):
        load_pack(path)


def test_a_pack_whose_parts_are_not_its_methods_classes_is_refused():
    method = method_class("grace")()
    with pytest.raises(PackError, match="its state is a DeltaState, not the GraceState of method 'grace'"):
        method.config_of(_grace_pack(state=DeltaState()))
    with pytest.raises(PackError, match="its config is a dict"):
        method.config_of(_grace_pack(config={"eps_init": 2.5}))


def test_a_state_class_must_be_a_dataclass_without_the_routing_fields():
    from dataclasses import dataclass

    @dataclass
    class Clashing:
        subject_spans: list | None = None

    for state_class in (dict, Clashing):
        cls = type("Odd", (EditMethod,), {"name": "odd", "config_class": GraceConfig, "state_class": state_class,
                                          "compute": None, "contributions": None, "site_layouts": None})
        with pytest.raises(ConfigError, match="state_class must be a dataclass"):
            register(cls)
    assert "odd" not in method_names()


# ---------------------------------------------------------------------------- tensor names
def test_tensor_names_come_from_one_helper():
    assert tensor_name("L3.mlp_out", "U") == "L3.mlp_out/U"
    assert split_tensor_name("L3.mlp_out/route_keys") == ("L3.mlp_out", "route_keys")
    assert split_tensor_name("stray") == ("stray", "")
    tensors = named({"L1.mlp_out": {"U": torch.zeros(1)}, "L2.mlp_out": {"U": torch.ones(1), "V": torch.ones(2)}})
    assert list(tensors) == ["L1.mlp_out/U", "L2.mlp_out/U", "L2.mlp_out/V"]
    assert list(site_tensors(tensors, "L2.mlp_out")) == ["U", "V"] and site_tensors(tensors, "L9.mlp_out") == {}
