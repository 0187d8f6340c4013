"""A method family from outside the package, as its own installed distribution (issues 19 and 36).

``tests/plugins/steer`` is a small distribution: the method ``steer`` written against
``grace_hooks.method_kit`` alone, declared in the entry point group ``grace_hooks.methods``. The
test installs it with pip into a folder of its own and puts that folder on the path, as an installed
package is; nothing in ``grace_hooks/`` names it and the tests never register it. It is held to the
contract (the edit works, unrelated inputs are unchanged, save -> load is bit-identical, rollback is
exact, no hook is left), and found by the CLI, the server and ``from_pretrained``. A family defined
in-process holds the kit's gate and view contracts (a typed ``GateContext``, a ``LayerView``)."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from dataclasses import FrozenInstanceError, dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from conftest import UNRELATED, assert_reloads_and_rolls_back, last_logits, next_token, param_hash, target_id
from grace_hooks import EditableModel
from grace_hooks.bases.architectures import num_layers
from grace_hooks.cli.export import export_peft
from grace_hooks.errors import ConfigError, PackError
from grace_hooks.method_kit import (ComputedEdit, EditMethod, Effect, EffectLayer, Gate, GateContext, LayerView, Plan, Site,
                                    SiteContribution, TensorSpec, option, register, stored, unregister)
from grace_hooks.methods import get_method, method_names
from grace_hooks.testing import TINY_REQUESTS

PLUGIN = Path(__file__).parent / "plugins" / "steer"


def _on_path(folder: Path):
    sys.path.insert(0, str(folder))
    importlib.invalidate_caches()  # importlib.metadata and the import system see the new folder


def _off_path(folder: Path, *modules: str):
    sys.path.remove(str(folder))
    for name in modules:
        sys.modules.pop(name, None)
    importlib.invalidate_caches()


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``tests/plugins/steer`` installed by pip into a folder of its own, put on the path."""
    site = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")  # a copy: a build writes its egg-info beside the sources
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(_copy_tree(PLUGIN, build / "steer"))],
                   check=True, capture_output=True, text=True)
    assert (site / "grace_hooks_steer").is_dir() and list(site.glob("grace_hooks_steer-*.dist-info"))
    _on_path(site)
    yield site
    unregister("steer")
    _off_path(site, "grace_hooks_steer")


def _copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    return dst


@pytest.fixture
def steer(installed):
    assert "steer" in method_names()  # found through its entry point, never registered here
    return "steer"


# ---------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_method_from_outside_the_package_keeps_the_contract(arch, steer, make_model, tokenizer, tmp_path):
    model = make_model(arch)
    weights_before = param_hash(model)
    em = EditableModel(model, tokenizer, name=f"tiny-{arch}")
    prompts = [r.text for r in TINY_REQUESTS]
    base_edit, base_unrelated = last_logits(model, tokenizer, prompts), last_logits(model, tokenizer, UNRELATED)

    em.edit(TINY_REQUESTS, method=steer, pack="s1")
    assert [next_token(em, tokenizer, p) for p in prompts] == [target_id(tokenizer, r) for r in TINY_REQUESTS]
    assert all(torch.equal(a, b) for a, b in zip(last_logits(em, tokenizer, UNRELATED), base_unrelated))
    with em.routes() as hits, torch.no_grad():
        em(**tokenizer(prompts[0], return_tensors="pt"))
    assert {pack for *_, pack, _ in hits} == {"s1"}
    edited = last_logits(em, tokenizer, prompts)

    # what health and export ask of an effect: no dense update, no LoRA form (the defaults)
    assert em.health(UNRELATED[:1]) == {}
    with pytest.raises(PackError, match="no LoRA form"):
        export_peft(em.pack("s1"), tmp_path / "lora")

    # it composes with a built-in family loaded on top (GRACE at the same site; its keys win where they fire)
    em.edit(TINY_REQUESTS[:1], method="grace", pack="g", layer=num_layers(model) - 1)
    assert all(torch.equal(a, b) for a, b in zip(last_logits(em, tokenizer, UNRELATED), base_unrelated))
    em.remove_pack("g")
    assert all(torch.equal(a, b) for a, b in zip(last_logits(em, tokenizer, prompts), edited))

    # save -> load on a fresh copy of the base: bit-identical; rollback is exact, no hook left, weights untouched
    assert_reloads_and_rolls_back(em, "s1", arch, make_model, tokenizer, prompts, edited, base_edit, weights_before,
                                  tmp_path / "adapters")


# ---------------------------------------------------------------------------- found everywhere
def _saved_steer_pack(make_model, tokenizer, adapters: Path) -> Path:
    em = EditableModel(make_model("llama"), tokenizer, name="tiny-llama")
    em.edit(TINY_REQUESTS[:1], method="steer", pack="s1")
    em.save_pack("s1", adapters)
    em.close()
    return adapters


def _cli(*args, site: Path | None) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter; ``site`` (the plugin's install folder) on its path or not."""
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "grace_hooks.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_the_cli_finds_an_installed_method_and_lists_its_packs(steer, installed, make_model, tokenizer, tmp_path):
    adapters = _saved_steer_pack(make_model, tokenizer, tmp_path / "adapters")
    listed = _cli("methods", site=installed)
    assert listed.returncode == 0, listed.stderr
    assert "steer:" in listed.stdout and "key radius, relative to the key's norm" in listed.stdout
    shown = _cli("ls", "--adapters", adapters, site=installed)
    assert shown.returncode == 0, shown.stderr
    row = next(line.split() for line in shown.stdout.splitlines() if line.startswith("s1 "))
    assert row[1] == "steer"
    # without the distribution the pack is still listed, and says what it needs
    missing = _cli("ls", "--adapters", adapters, site=None)
    assert "steer (not installed)" in missing.stdout


def test_the_server_serves_and_computes_an_installed_methods_packs(steer, make_model, tokenizer, tmp_path):
    pytest.importorskip("fastapi")
    from grace_hooks.serve import ServeConfig, create_app, running
    import urllib.request

    adapters = _saved_steer_pack(make_model, tokenizer, tmp_path / "adapters")
    served = EditableModel(make_model("llama"), tokenizer, name="tiny-llama")
    app = create_app(served, adapters, ServeConfig(api_key="k", watch_s=0))
    assert [p.name for p in served.packs] == ["s1"]  # the folder's pack loaded at start
    body = {"name": "s2", "method": "steer", "requests": [TINY_REQUESTS[1].to_dict()], "options": {}}
    with running(app) as url:
        req = urllib.request.Request(url + "/v1/packs", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": "Bearer k"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert resp.status == 201  # created
    assert [p.name for p in served.packs] == ["s1", "s2"] and (adapters / "s2").is_dir()
    served.close()


# ---------------------------------------------------------------------------- a gate and a view of its own
NUDGE_ON = "nudge.on"
gate_calls: list[tuple] = []  # what the gate of the in-process family below saw, call by call


class Nudges(EffectLayer):
    """Every loaded ``nudge`` pack at a site: under the option NUDGE_ON its gate claims every real
    position (no key), where the sum of the packs' biases is added."""

    def gate(self, x, valid, past, context: GateContext) -> Gate | None:
        try:
            context.options["written"] = True  # the thread's options: read only
            wrote = True
        except TypeError:
            wrote = False
        if not self or not context.options.get(NUDGE_ON):
            return None
        context.kept["forwards"] = context.kept.get("forwards", 0) + 1  # a dict of its own, kept between forwards
        gate_calls.append((type(context), wrote, context.kept["forwards"]))
        return Gate(valid.reshape(-1), "<nudge gate>")

    def plan(self, flat_x, hits, gate) -> Plan | None:
        if gate is None or not bool(gate.fire.any()):
            return None
        rows, bias = gate.fire.nonzero().squeeze(1), sum(e.bias for e in self.effects.values())

        def add(flat: torch.Tensor) -> None:
            flat[rows] = flat[rows] + bias.to(flat)

        return add


class NudgesView(LayerView):
    of = Nudges

    def total(self) -> torch.Tensor:
        """The sum of the loaded biases: a new tensor."""
        return sum(e.bias for e in self._layer.effects.values()).clone()


@dataclass
class Nudge(Effect):
    bias: torch.Tensor  # (d_out,)
    layer: ClassVar[type[EffectLayer]] = Nudges

    def stored(self) -> "Nudge":
        return Nudge(stored(self.bias))


@dataclass
class NudgeConfig:
    layer: int = option(1, "block whose MLP output is nudged")
    total: float = option(1.0, "the sum of the loaded biases after this pack, in every output unit")


class NudgeMethod(EditMethod):
    """Each pack brings the sum of the nudges loaded at its site to ``total``: it reads what is
    loaded through its view, and tries to spoil what it read (a copy)."""

    name = "nudge"
    config_class = NudgeConfig
    read: list[torch.Tensor] = []

    def compute(self, ctx, requests, cfg: NudgeConfig) -> ComputedEdit:
        site = Site(cfg.layer)
        loaded = ctx.loaded.site(site.name)
        view = loaded.view(NudgesView) if loaded is not None else None
        before = view.total() if view is not None else torch.zeros(site.dims(ctx.model)[1])
        self.read.append(before.clone())
        bias = torch.full_like(before, cfg.total) - before
        before.mul_(-5.0)  # the method's own copy: what is loaded stays as it was
        return ComputedEdit(sites=[site.name], tensors={f"{site.name}/bias": bias})

    def site_layouts(self, config) -> list[dict[str, TensorSpec]]:
        return [{"bias": TensorSpec(("d_out",))}]

    def contributions(self, pack) -> dict[str, SiteContribution]:
        return {s: SiteContribution(Nudge(pack.site_tensors(s)["bias"])) for s in pack.sites}


def test_a_familys_gate_sees_a_typed_context_and_its_method_reads_a_view(make_model, tokenizer):
    """The kit's contracts for a family's own gate (a GateContext: the thread's options read-only, a
    dict of its own kept between forwards) and for what its method reads of the loaded packs (a
    LayerView of its own, whose reads are copies)."""
    register(NudgeMethod)
    gate_calls.clear()
    NudgeMethod.read.clear()
    try:
        model = make_model("llama")
        em = EditableModel(model, tokenizer, name="tiny-llama")
        base = last_logits(model, tokenizer, UNRELATED)
        em.edit(TINY_REQUESTS[:1], method="nudge", pack="n1", total=1.0)
        em.edit(TINY_REQUESTS[:1], method="nudge", pack="n2", total=3.0)
        site = em.pack("n1").sites[0]
        read = NudgeMethod.read
        assert torch.equal(read[0], torch.zeros_like(read[0])) and torch.equal(read[1], torch.ones_like(read[1]))
        total = em.loaded.site(site).view(NudgesView).total()
        assert torch.equal(total, torch.full_like(total, 3.0))  # n1's bias was not spoilt by n2's compute
        assert all(torch.equal(a, b) for a, b in zip(last_logits(em, tokenizer, UNRELATED), base))  # the gate is off
        assert gate_calls == []
        with em.edit_context() as ctx, ctx.option(NUDGE_ON, True):
            nudged = last_logits(em, tokenizer, UNRELATED[:2])
        assert not any(torch.equal(a, b) for a, b in zip(nudged, base))
        assert gate_calls == [(GateContext, False, 1), (GateContext, False, 2)]  # one forward per prompt
        with pytest.raises(FrozenInstanceError):
            em.loaded.site(site).view(NudgesView).extra = 1
        em.close()
    finally:
        unregister("nudge")


# ---------------------------------------------------------------------------- names are taken once
@dataclass
class _Options:
    pass


def test_a_name_that_is_taken_is_refused():
    class Impostor(EditMethod):
        name = "grace"
        config_class = _Options

    with pytest.raises(ConfigError, match="'grace' is taken by grace_hooks.methods"):
        register(Impostor)
    assert "grace" in method_names()

    class Nameless(EditMethod):
        name = "not a name"
        config_class = _Options

    with pytest.raises(ConfigError, match="short identifier"):
        register(Nameless)


def _fake_distribution(root: Path, name: str, entry_points: str, modules: dict[str, str]) -> Path:
    """An installed distribution's metadata (what pip writes) and its modules, in folder ``root``."""
    info = root / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[grace_hooks.methods]\n{entry_points}\n")
    for module, text in modules.items():
        (root / f"{module}.py").write_text(text)
    return root


def test_a_broken_or_clashing_plugin_is_reported_and_the_others_still_work(tmp_path, caplog):
    clash = ("from dataclasses import dataclass\nfrom grace_hooks.method_kit import EditMethod\n"
             "@dataclass\nclass Options:\n    pass\n"
             "class Clash(EditMethod):\n    name = 'grace'\n    config_class = Options\n")
    site = _fake_distribution(tmp_path, "clashing_plugin",
                              "grace = clash_module:Clash\nbroken = no_such_module_anywhere:Thing",
                              {"clash_module": clash})
    _on_path(site)
    try:
        with pytest.raises(ConfigError, match="unknown edit method 'broken'.*ModuleNotFoundError"):
            get_method("broken")
        assert "is taken by" in caplog.text  # the clash was logged, and refused
        assert type(get_method("grace")).__module__.startswith("grace_hooks.methods")  # the built-in one still
    finally:
        _off_path(site, "clash_module")
