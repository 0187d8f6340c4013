"""Weight-delta methods (MEMIT, ENCORE, O-Edit): the closed form, the chain state carried by packs,
non-mutation while computing, the C0 cache, PEFT export and health figures."""
import json

import pytest
import torch
from click.testing import CliRunner

from conftest import UNRELATED, last_logits, param_hash
from grace_hooks import EditableModel, EditRequest
from grace_hooks.bases.architectures import Site
from grace_hooks.bases.hooks import count_hooks
from grace_hooks.cli import main
from grace_hooks.cli.export import export_peft
from grace_hooks.config import make_config
from grace_hooks.errors import ConfigError, PackError
from grace_hooks.eval.metrics import score_pairs
from grace_hooks.locate.covariance import cached_sample_corpus, model_digest, second_moment
from grace_hooks.methods import get_method
from grace_hooks.methods.delta.config import EncoreConfig
from grace_hooks.methods.delta.method import router_keys
from grace_hooks.testing import DELTA_REQUESTS, DELTA_TINY

MORE = [EditRequest(prompt="the city of {}", subject="gondor", target_new="paris"),
        EditRequest(prompt="the language of {}", subject="carol", target_new="french")]
ENCORE_TINY = {**DELTA_TINY, "norm_lambda": 1.0}


def _edited(make_model, tokenizer, method="memit", arch="llama", **cfg):
    em = EditableModel(make_model(arch), tokenizer, name=f"tiny-{arch}")
    em.edit(DELTA_REQUESTS, method=method, pack="p1", **{**DELTA_TINY, **cfg})
    return em


def _c0(em, site: str, cfg) -> torch.Tensor:
    """C0 as the method measured it (from the disk cache the edit filled)."""
    model = em.base_model
    digest = model_digest(model)
    corpus = cached_sample_corpus(model, em.tokenizer, digest, cfg["corpus_texts"], cfg["corpus_tokens"])
    moment = second_moment(model, em.tokenizer, Site.parse(site), corpus, 100_000, model_hash=digest)
    assert moment.from_cache
    return moment.matrix.to(torch.float64)


def test_factors_equal_the_float64_closed_form(make_model, tokenizer):
    """dW = U V^T from the stored factors equals R K^T (lambda C0 + K K^T)^-1 computed directly."""
    em = _edited(make_model, tokenizer, "memit", mom2_weight=3.0)
    pack = em.pack("p1")
    assert len(pack.sites) == 3  # default layers on a 4-block model: 0..2
    for site in pack.sites:
        t = {k: v.to(torch.float64) for k, v in pack.site_tensors(site).items()}
        K, U = t["keys"].T, t["U"]
        M = 3.0 * _c0(em, site, DELTA_TINY) + K @ K.T
        direct = U @ K.T @ torch.linalg.inv(M)
        assert torch.allclose(U @ t["V"].T, direct, rtol=1e-4, atol=1e-6 * float(direct.abs().max()))


def test_computing_an_edit_leaves_the_model_unchanged(make_model, tokenizer):
    for method in ("memit", "encore", "oedit"):
        model = make_model("llama")
        em = EditableModel(model, tokenizer, name="tiny")
        em.edit(MORE, method=method, pack="earlier", **DELTA_TINY)  # a loaded pack the computation sees
        enc = tokenizer(UNRELATED[:2] + [r.text for r in DELTA_REQUESTS], return_tensors="pt", padding=True)
        before_logits, before_hash, before_hooks = em(**enc).logits.detach(), param_hash(model), count_hooks(model)
        impl = get_method(method)
        with em.edit_context() as ctx:
            computed = impl.compute(ctx, DELTA_REQUESTS, make_config(impl.config_class, DELTA_TINY))
        assert computed.sites and param_hash(model) == before_hash and count_hooks(model) == before_hooks
        assert torch.equal(em(**enc).logits, before_logits)
        assert [p.name for p in em.packs] == ["earlier"] and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("previous_edits", [True, None])
def test_encore_carries_earlier_keys_through_packs(make_model, tokenizer, tmp_path, previous_edits):
    """ENCORE's normal matrix holds lambda_N I + sum K_p K_p^T of the loaded packs (by default only in
    global mode: these routed edits leave the earlier keys out); a chain continued after a reload gives
    the same second pack."""
    cfg = {**ENCORE_TINY, "previous_edits": previous_edits}
    em = _edited(make_model, tokenizer, "encore", **cfg)
    em.edit(MORE, method="encore", pack="p2", **cfg)
    p1, p2 = em.pack("p1"), em.pack("p2")
    for site in p2.sites:
        t1 = {k: v.to(torch.float64) for k, v in p1.site_tensors(site).items()}
        t2 = {k: v.to(torch.float64) for k, v in p2.site_tensors(site).items()}
        K1, K2 = t1["keys"].T, t2["keys"].T
        lam = make_config(EncoreConfig, ENCORE_TINY).c0_weight(len(K1))  # routed: a tenth of mom2_weight
        assert lam == pytest.approx(0.1)
        M = lam * _c0(em, site, DELTA_TINY) + 1.0 * torch.eye(len(K1)) + K2 @ K2.T
        if previous_edits:
            M = M + K1 @ K1.T
        torch.testing.assert_close(M @ t2["V"], K2, rtol=1e-4, atol=1e-4)
    em.save_pack("p1", tmp_path)
    again = EditableModel(make_model("llama"), tokenizer, name="tiny-llama")
    again.load_adapters(tmp_path)
    again.edit(MORE, method="encore", pack="p2", **cfg)
    for name, t in p2.tensors.items():
        torch.testing.assert_close(again.pack("p2").tensors[name], t, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("orthogonal_to", ["updates", "keys"])
def test_oedit_updates_are_orthogonal_to_earlier_ones(make_model, tokenizer, orthogonal_to):
    em = _edited(make_model, tokenizer, "oedit", orthogonal_to=orthogonal_to)
    em.edit(MORE, method="oedit", pack="p2", orthogonal_to=orthogonal_to, **DELTA_TINY)
    for site in em.pack("p2").sites:
        t1, t2 = em.pack("p1").site_tensors(site), em.pack("p2").site_tensors(site)
        dw1, dw2 = t1["U"] @ t1["V"].T, t2["U"] @ t2["V"].T
        if orthogonal_to == "updates":  # <dW_new, dW_old>_F = 0
            assert abs(float((dw1 * dw2).sum())) < 1e-4 * float(dw1.norm() * dw2.norm())
        else:  # the new update does not move the earlier keys
            assert float((dw2 @ t1["keys"].T).norm()) < 1e-4 * float(dw2.norm() * t1["keys"].norm())
        assert float(dw2.norm()) > 0


def test_c0_comes_from_the_disk_cache_on_a_second_run(make_model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("GRACE_HOOKS_CACHE", str(tmp_path))
    first = _edited(make_model, tokenizer, "memit").pack("p1").metrics["c0"]
    second = _edited(make_model, tokenizer, "memit").pack("p1").metrics["c0"]  # a new process would do the same
    assert not any(v["from_cache"] for v in first.values()) and all(v["from_cache"] for v in second.values())
    assert all(v["corpus"].startswith("model-sampled") for v in second.values())
    assert len(list((tmp_path / "covariance").glob("*.safetensors"))) == 3 and len(list((tmp_path / "corpus").glob("*.json"))) == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D sites, fan_in_fan_out
def test_peft_export_gives_the_same_logits(make_model, tokenizer, tmp_path, arch):
    from peft import PeftModel

    em = _edited(make_model, tokenizer, "encore", arch=arch, mode="global", norm_lambda=1.0)
    em.save_pack("p1", tmp_path / "adapters")
    result = CliRunner().invoke(main, ["export", "p1", str(tmp_path / "lora"), "--adapters", str(tmp_path / "adapters"),
                                       "--format", "peft"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "lora" / "p1" / "adapter_config.json").read_text())  # DEST/NAME
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] == (arch == "gpt2")
    peft_model = PeftModel.from_pretrained(make_model(arch), str(tmp_path / "lora" / "p1")).eval()
    enc = tokenizer([r.text for r in DELTA_REQUESTS] + UNRELATED, return_tensors="pt", padding=True)
    with torch.no_grad():
        ours, theirs = em(**enc).logits, peft_model(**enc).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)  # same float32 ops: equal to rounding
    with torch.no_grad(), em.disabled():
        assert not torch.allclose(em(**enc).logits, ours, atol=1e-3)  # the adapter does carry the edit


def test_peft_export_refuses_what_lora_cannot_express(make_model, tokenizer, tmp_path):
    routed = _edited(make_model, tokenizer, "memit", mode="routed")
    with pytest.raises(PackError, match="routed"):
        export_peft(routed.pack("p1"), tmp_path / "a")
    routed.edit(DELTA_REQUESTS[:1], method="grace", pack="g")
    with pytest.raises(PackError, match="no weight delta"):
        export_peft(routed.pack("g"), tmp_path / "b")
    gemma = _edited(make_model, tokenizer, "memit", arch="gemma3_text", mode="global")  # added after the post-MLP norm
    with pytest.raises(PackError, match="post_feedforward_layernorm"):
        export_peft(gemma.pack("p1"), tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_health_reports_weight_growth_and_activation_drift(make_model, tokenizer):
    em = _edited(make_model, tokenizer, "memit", mode="global")
    em.edit(MORE, method="memit", pack="p2", mode="routed", **{k: v for k, v in DELTA_TINY.items()})
    report = em.health(UNRELATED)
    assert set(report) == set(em.pack("p1").sites)
    for site, r in report.items():
        w0 = Site.parse(site).weight(em.base_model).detach().double()
        deltas = [em.pack(p).site_tensors(site) for p in ("p1", "p2")]
        dense = [(t["U"] @ t["V"].T).double() for t in deltas]
        assert r["weight_norm_ratio"] == pytest.approx(float((w0 + dense[0]).norm() / w0.norm()), rel=1e-6)
        assert r["weight_norm_ratio_all"] == pytest.approx(float((w0 + dense[0] + dense[1]).norm() / w0.norm()), rel=1e-6)
        assert r["activation_drift"] > 0
    em.remove_pack("p1")
    routed_only = em.health(UNRELATED)  # the routed pack does not fire on unrelated text
    assert all(r["weight_norm_ratio"] == 1.0 and r["activation_drift"] == 0.0 for r in routed_only.values())
    em.remove_pack("p2")
    assert em.health(UNRELATED) == {}


@pytest.mark.parametrize("overrides,message", [
    ({"layers": "two"}, "expected e.g."),
    ({"layers": "1-3"}, "must lie in 0..2"),
    ({"mode": "everywhere"}, "must be one of"),
    ({"norm_lambda": 1.0}, "unknown option"),  # an ENCORE option given to MEMIT
    ({"passes": 0}, "at least one sweep"),
])
def test_bad_delta_config_is_refused(make_model, tokenizer, overrides, message):
    em = EditableModel(make_model("llama"), tokenizer)
    with pytest.raises(ConfigError, match=message):
        em.edit(DELTA_REQUESTS, method="memit", **overrides)
    assert em.packs == [] and count_hooks(em.base_model) == 0


@pytest.mark.parametrize("scope", ["span", "key"])
def test_routed_pack_keys_and_spans_follow_the_scope(make_model, tokenizer, scope):
    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    em.edit(DELTA_REQUESTS, method="memit", pack="p", mode="routed", scope=scope, **DELTA_TINY)
    pack = em.pack("p")
    keys_per_request = 1 if scope == "span" else 2 + DELTA_TINY["n_prefixes"]  # key: the mean, the bare prompt, each prefix
    for site in pack.sites:
        t = pack.site_tensors(site)
        assert len(router_keys(t)) == len(t["route_radii"]) == keys_per_request * len(DELTA_REQUESTS)
        assert ("route_keys" in t) == (scope == "key")  # scope 'span' routes by the edit keys, stored once
    if scope == "key":
        assert pack.routing.subject_spans is None
        return
    assert pack.routing.subject_spans == [[tokenizer(r.subject, add_special_tokens=False).input_ids] for r in DELTA_REQUESTS]
    base = last_logits(EditableModel(make_model("llama"), tokenizer, name="base"), tokenizer, ["the capital of gondor"])[0]
    assert torch.equal(last_logits(em, tokenizer, ["the capital of gondor"])[0], base)  # another subject: untouched
    with em.routes() as hits, torch.no_grad():
        em(**tokenizer("the capital of narnia", return_tensors="pt"))
    assert {(pos, key) for _, _, pos, _, key in hits} == {(3, 0)}  # the subject's token, its own key only


def test_edit_reports_per_request_landing_and_phase_seconds(make_model, tokenizer, monkeypatch):
    """Target vectors use target_prefixes of the context prefixes; the metrics say per request
    whether the applied update makes the target the greedy continuation, and where the time went."""
    import grace_hooks.methods.delta.method as delta_module

    seen = []
    real = delta_module.target_vectors

    def spy(model, tok, layer, requests, prefixes, *args, **kwargs):
        seen.append(len(prefixes))
        return real(model, tok, layer, requests, prefixes, *args, **kwargs)

    monkeypatch.setattr(delta_module, "target_vectors", spy)
    em = EditableModel(make_model("llama"), tokenizer, name="tiny-llama")
    info = em.edit(DELTA_REQUESTS, method="encore", pack="p1", **{**ENCORE_TINY, "n_prefixes": 2, "target_prefixes": 1})
    assert seen == [2]  # the bare prompt and one prefix
    metrics = em.pack(info.name).metrics
    assert len(metrics["landed"]) == len(DELTA_REQUESTS) and all(isinstance(x, bool) for x in metrics["landed"])
    assert metrics["landed_share"] == sum(metrics["landed"]) / len(DELTA_REQUESTS)
    assert {"target vectors", "keys and residuals", "solve", "check"} <= set(metrics["seconds"])
    scores = score_pairs(em, [r.text for r in DELTA_REQUESTS], [r.target_new for r in DELTA_REQUESTS])
    assert metrics["landed"] == [bool(a == 1.0) for a in scores.accuracy]  # what the applied pack really does


def test_a_second_sweep_adds_its_residual_to_u_and_closes_on_z(make_model, tokenizer):
    """passes=2: V = M^-1 K and the keys stay those of the first sweep (the pack keeps its size); U gains
    the second sweep's residuals; the update then carries the prompts closer to z (a heavy C0 weight
    leaves a gap for the second sweep to close)."""
    one = _edited(make_model, tokenizer, "memit", mom2_weight=50.0)
    two = _edited(make_model, tokenizer, "memit", mom2_weight=50.0, passes=2)
    p1, p2 = one.pack("p1"), two.pack("p1")
    for site in p1.sites:
        a, b = p1.site_tensors(site), p2.site_tensors(site)
        assert b["U"].shape == a["U"].shape and torch.equal(a["keys"], b["keys"]) and torch.equal(a["V"], b["V"])
        assert not torch.equal(a["U"], b["U"]) and "residual_norm_sweep2" in p2.metrics["layers"][site]
    assert p2.metrics["z_reached_mean"] > p1.metrics["z_reached_mean"] + 0.05
    assert p2.metrics["landed_share"] >= p1.metrics["landed_share"]


def test_on_gemma_a_delta_is_added_after_the_post_mlp_norm(make_model, tokenizer):
    """Gemma 3 normalises the MLP output before the residual add: a global delta keyed on the MLP's
    hidden activations x changes that norm's output by exactly dW x (so the solve's residual reaches
    the residual stream as is), the MLP's own output not at all; removal leaves no hook behind."""
    em = _edited(make_model, tokenizer, "memit", arch="gemma3_text", mode="global")
    model, site = em.base_model, Site.parse(em.pack("p1").sites[0])  # the lowest edited block: its input is the base's
    block = model.get_submodule("model.layers")[site.layer]
    seen = {}
    hooks = [block.mlp.down_proj.register_forward_hook(lambda m, a, o: seen.update(x=a[0], mlp=o)),
             block.post_feedforward_layernorm.register_forward_hook(lambda m, a, o: seen.update(y=o))]
    enc = tokenizer(UNRELATED[:2], return_tensors="pt", padding=True)
    try:
        with torch.no_grad():
            with em.disabled():
                em(**enc)
            base = dict(seen)
            em(**enc)
    finally:
        for h in hooks:
            h.remove()
    t = em.pack("p1").site_tensors(site.name)
    torch.testing.assert_close(seen["x"], base["x"])
    torch.testing.assert_close(seen["mlp"], base["mlp"])  # the MLP's own output is left alone
    torch.testing.assert_close(seen["y"] - base["y"], seen["x"] @ t["V"] @ t["U"].T, rtol=1e-4, atol=1e-5)
    em.remove_pack("p1")
    assert count_hooks(model) == 0


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_a_gemma_pack_from_before_effects_moved_after_the_norm_is_refused(make_model, tokenizer, tmp_path, arch):
    """A pack made when Gemma's effects were added before the post-MLP norm would act otherwise now:
    loading it fails and says to compute it again; packs of other architectures load as before."""
    em = _edited(make_model, tokenizer, "memit", arch=arch)
    em.save_pack("p1", tmp_path)
    header = tmp_path / "p1" / "edit_pack.json"
    stored = json.loads(header.read_text())
    stored["library_version"] = "0.1.0"
    header.write_text(json.dumps(stored))
    again = EditableModel(make_model(arch), tokenizer, name=f"tiny-{arch}")
    if arch == "llama":
        assert again.load_pack(tmp_path / "p1").n_edits == len(DELTA_REQUESTS)
        return
    with pytest.raises(PackError, match="post_feedforward_layernorm.*Compute it again"):
        again.load_pack(tmp_path / "p1")
    assert count_hooks(again.base_model) == 0


def test_a_pack_stored_with_a_retired_option_still_loads(make_model, tokenizer, tmp_path):
    """z_through_norm went when Gemma's deltas moved after the norm: a pack that stored its default loads;
    asking for it now says why it went."""
    em = _edited(make_model, tokenizer, "encore", norm_lambda=1.0)
    em.save_pack("p1", tmp_path)
    config = tmp_path / "p1" / "edit_pack.json"
    stored = json.loads(config.read_text())
    stored["method_config"]["z_through_norm"] = False
    config.write_text(json.dumps(stored))
    again = EditableModel(make_model("llama"), tokenizer, name="tiny-llama")
    again.load_pack(tmp_path / "p1")
    assert again.pack("p1").n_edits == len(DELTA_REQUESTS)
    with pytest.raises(ConfigError, match="was removed: on Gemma"):
        again.edit(DELTA_REQUESTS[:1], method="encore", pack="p2", z_through_norm=False)


def test_edit_without_a_method_uses_the_default(make_model, tokenizer):
    from grace_hooks.config import DEFAULT_METHOD

    em = EditableModel(make_model("llama"), tokenizer, name="tiny-llama")
    info = em.edit(DELTA_REQUESTS[:1], pack="p1", **DELTA_TINY)
    assert info.method == DEFAULT_METHOD
