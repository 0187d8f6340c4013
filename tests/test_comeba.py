"""COMEBA-HK hook layers: accumulation, stacking and rollback, squash, the z-score gate."""
import pytest
import torch
from click.testing import CliRunner

from conftest import UNRELATED, last_logits
from grace_hooks import EditableModel, EditRequest
from grace_hooks.bases.architectures import Site
from grace_hooks.bases.hooks import count_hooks
from grace_hooks.cli import main
from grace_hooks.cli.folder_ops import squash_in_folder
from grace_hooks.errors import ConfigError, PackError
from grace_hooks.methods import get_method
from grace_hooks.methods.comeba.hook_layer import ZSCORE_GATE, HookIncrement, HookLayer, HookLayerView, zscores
from grace_hooks.methods.comeba.squash import hook_increment, squash_packs
from grace_hooks.store.adapters_dir import LOCK_NAME
from grace_hooks.store.packs import load_pack
from grace_hooks.testing import DELTA_REQUESTS, DELTA_TINY

GATES = ("router", "zscore")
# three batches of one chain: the second and third edit other subjects
BATCHES = [DELTA_REQUESTS[:1], DELTA_REQUESTS[1:2], DELTA_REQUESTS[2:]]
PROBES = [r.text for r in DELTA_REQUESTS] + UNRELATED[:3]


def _chain(make_model, tokenizer, gate, n=3, arch="llama", **cfg):
    em = EditableModel(make_model(arch), tokenizer, name="tiny")
    for i, batch in enumerate(BATCHES[:n]):
        em.edit(batch, method="comeba_hk", pack=f"b{i}", gate=gate, **DELTA_TINY, **cfg)
    return em


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------- z-score maths
def test_zscores_match_the_papers_formula_and_ignore_padding():
    m = torch.tensor([[1.0, 2.0, 7.0, 3.0], [5.0, 1.0, 1.5, 0.0]])
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])
    z, _ = zscores(m, valid)
    row0 = (m[0] - m[0].mean()) / m[0].std()  # the reference code: torch's unbiased std over the sequence
    torch.testing.assert_close(z[0], row0.double())
    row1 = m[1, :3]
    torch.testing.assert_close(z[1, :3], ((row1 - row1.mean()) / row1.std()).double())
    assert z[1, 3] == float("-inf")  # padding never fires
    z1, _ = zscores(torch.tensor([[4.0]]), torch.tensor([[True]]))
    assert z1[0, 0] == float("-inf")  # a lone position has no spread to compare against


def test_cached_tokens_are_scored_against_every_earlier_position():
    """A token generated one at a time: its z-score is over the prompt, the tokens generated
    before it and itself, as if the whole sequence so far had been scored at once."""
    layer = HookLayer(4, 3)
    layer.add("p", HookIncrement(keys=torch.zeros(1, 4), dense=torch.zeros(3, 4), alpha=1.0))
    seq = torch.tensor([[0.1, 0.3, 0.2, 0.1, 2.0, 0.2, 5.0]])
    change = torch.zeros(1, 7, 3)
    change[..., 0] = seq
    fired_prompt, running = layer.zscore_gate(change[:, :5], torch.ones(1, 5, dtype=torch.bool), past=0)
    full, _ = zscores(seq[:, :5], torch.ones(1, 5, dtype=torch.bool))
    assert torch.equal(fired_prompt, full >= 1.0)
    for t in (5, 6):  # one new token per call, as with a KV cache
        fired, running = layer.zscore_gate(change[:, t:t + 1], torch.ones(1, 1, dtype=torch.bool), past=t, running=running)
        z_all, _ = zscores(seq[:, :t + 1], torch.ones(1, t + 1, dtype=torch.bool))
        assert bool(fired[0, 0]) == bool(z_all[0, t] >= 1.0)
    # a call that does not continue the kept sequence starts afresh (the lone token cannot fire)
    assert not layer.zscore_gate(change[:, 6:7], torch.ones(1, 1, dtype=torch.bool), past=3, running=running)[0].any()
    # nor one whose statistics were kept before the hook layer changed
    layer.add("q", HookIncrement(keys=torch.zeros(1, 4), dense=torch.zeros(3, 4), alpha=1.0))
    assert not layer.zscore_gate(change[:, 6:7], torch.ones(1, 1, dtype=torch.bool), past=7, running=running)[0].any()


def test_cached_generation_matches_stepwise_reference(make_model, tokenizer):
    """Greedy decoding with a KV cache equals decoding that re-runs the prompt in one call and
    then feeds each generated token with the cache by hand (the gate keeps the statistics)."""
    em = _chain(make_model, tokenizer, "zscore", n=1)
    enc = tokenizer(DELTA_REQUESTS[0].text, return_tensors="pt")
    out = em.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    ids, mask = enc.input_ids, enc.attention_mask
    # white box: the gate's running statistics, per site (version, batch, positions seen, count, sum, sum of squares)
    running = em._runtime.context.state
    for name in em.loaded.sites:  # every position fed so far entered the statistics (the last token is never fed)
        assert int(running[name, HookLayer]["zscore"][3][0]) == out.shape[1] - 1
    with torch.no_grad():
        step = em(input_ids=ids, attention_mask=mask, use_cache=True)
        tokens = []
        for _ in range(4):
            nxt = step.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(nxt))
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            step = em(input_ids=nxt, attention_mask=mask, past_key_values=step.past_key_values, use_cache=True)
    assert out[0, ids.shape[1]:].tolist() == tokens
    for name in em.loaded.sites:
        assert int(running[name, HookLayer]["zscore"][3][0]) == ids.shape[1] + 4


# ---------------------------------------------------------------------------- accumulation
def test_each_batch_builds_on_the_keys_absorbed_before(make_model, tokenizer):
    em = _chain(make_model, tokenizer, "router", n=2)
    site = em.pack("b0").sites[0]
    k0 = em.pack("b0").site_tensors(site)["keys"]
    rt = em.loaded.site(site)
    c0 = torch.eye(k0.shape[1], dtype=torch.float64)
    impl = get_method("comeba_hk")
    cfg = impl.config_class(**{**DELTA_TINY})
    got = impl.preservation(c0.shape[0], rt, cfg)
    k1 = em.pack("b1").site_tensors(site)["keys"]
    assert got.c0_weight == cfg.c0_weight(c0.shape[0]) and got.identity_weight == 0
    torch.testing.assert_close(got.previous_keys, torch.cat([k0, k1]).T)


@pytest.mark.parametrize("alpha_from", ["prompt_max", "subject"])
def test_zscore_alpha_only_falls_and_every_edit_prompt_fires(make_model, tokenizer, alpha_from):
    em = _chain(make_model, tokenizer, "zscore", alpha_from=alpha_from)
    alphas = [em.pack(f"b{i}").metrics["alpha"] for i in range(3)]
    for site in alphas[0]:
        seq = [a[site] for a in alphas]
        assert seq[0] <= 2.2 and seq == sorted(seq, reverse=True)
    for r in DELTA_REQUESTS:  # the last subject token (the prompt's last) gets the hook output at every site
        enc = tokenizer(r.text, return_tensors="pt")
        seen = {}
        hooks = [Site.parse(n).module(em.base_model).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, a[0]))
                 for n in em.loaded.sites]
        try:
            with torch.no_grad():
                em(**enc)
        finally:
            for h in hooks:
                h.remove()
        at = -1 if alpha_from == "subject" else slice(None)  # the subject's last token ends these prompts
        for n, x in seen.items():
            layer = em.loaded.site(n).view(HookLayerView)
            z, _ = zscores(layer.change(x).norm(dim=-1), torch.ones(x.shape[:2], dtype=torch.bool))
            assert (z[0, at] >= layer.alpha).any()
        with em.routes() as hits, torch.no_grad():  # the fires are traced (false-fire rate, recall)
            em(**enc)
        last = enc.input_ids.shape[1] - 1
        fired = {site for site, row, pos, pack, key in hits if pack == ZSCORE_GATE and (pos == last or alpha_from != "subject")}
        assert fired == set(seen)


# ---------------------------------------------------------------------------- stacking and rollback
@pytest.mark.parametrize("gate", GATES)
def test_removing_the_newest_of_three_gives_the_two_pack_outputs(make_model, tokenizer, gate, tmp_path):
    two = _chain(make_model, tokenizer, gate, n=2)
    want = last_logits(two, tokenizer, PROBES)
    for name in ("b0", "b1"):
        two.save_pack(name, tmp_path)
    three = EditableModel(make_model("llama"), tokenizer, name="tiny")
    three.load_adapters(tmp_path)
    three.edit(BATCHES[2], method="comeba_hk", pack="b2", gate=gate, **DELTA_TINY)
    assert not _same(last_logits(three, tokenizer, PROBES), want)
    three.remove_pack("b2")
    assert _same(last_logits(three, tokenizer, PROBES), want)
    for name in ("b1", "b0"):
        three.remove_pack(name)
    assert count_hooks(three.base_model) == 0


# ---------------------------------------------------------------------------- squash
@pytest.mark.parametrize("gate", GATES)
def test_squash_gives_the_chains_logits(make_model, tokenizer, gate):
    em = _chain(make_model, tokenizer, gate)
    chain = last_logits(em, tokenizer, PROBES)
    info = em.squash_packs(["b0", "b1", "b2"], into="all")
    assert [p.name for p in em.packs] == ["all"] and info.n_edits == 3
    assert _same(last_logits(em, tokenizer, PROBES), chain)
    # a later batch builds on the squashed pack as on the chain
    pack = em.pack("all")
    site = pack.sites[0]
    assert pack.site_tensors(site)["keys"].shape[0] == 3
    em.remove_pack("all")
    assert count_hooks(em.base_model) == 0


def test_squash_turns_dense_when_factors_would_be_larger():
    d_out, d_in = 4, 6

    def part(rank, seed):
        g = torch.Generator().manual_seed(seed)
        return {"keys": torch.randn(rank, d_in, generator=g), "U": torch.randn(d_out, rank, generator=g),
                "V": torch.randn(d_in, rank, generator=g), "alpha": torch.tensor([2.0 - seed / 10])}

    from grace_hooks.methods.comeba.squash import squash_site
    small = squash_site([part(1, 0), part(1, 1)])  # rank 2: 20 numbers < 24
    assert "U" in small and small["U"].shape == (d_out, 2)
    parts = [part(1, 0), part(1, 1), part(2, 2)]  # rank 4: 40 numbers > 24
    big = squash_site(parts)
    assert "dense" in big and "U" not in big
    want = sum(p["U"].double() @ p["V"].double().T for p in parts)
    torch.testing.assert_close(big["dense"], want.float())
    assert float(big["alpha"]) == pytest.approx(1.8) and big["keys"].shape == (4, d_in)
    many = [part(4, s) for s in range(3)]  # 12 keys > d_in: a d_in x d_in factor with the same K^T K
    keys = torch.cat([p["keys"] for p in many]).double()
    squashed = squash_site(many)["keys"].double()
    assert squashed.shape == (d_in, d_in)
    torch.testing.assert_close(squashed.T @ squashed, keys.T @ keys, rtol=1e-5, atol=1e-4)
    layer = HookLayer(d_in, d_out)  # the runtime's sum of the same chain is the same dense matrix
    for i, p in enumerate(parts):
        layer.add(str(i), HookIncrement(p["keys"], p["U"], p["V"]))
    x = torch.randn(3, d_in)
    assert torch.equal(layer.change(x), x @ big["dense"].T)


def test_squash_in_folder_replaces_the_chain_on_disk(make_model, tokenizer, tmp_path, monkeypatch):
    em = _chain(make_model, tokenizer, "router")
    chain = last_logits(em, tokenizer, PROBES)
    for name in ("b0", "b1", "b2"):
        em.save_pack(name, tmp_path)
    done = squash_in_folder(["b0", "b1", "b2"], "merged", tmp_path)  # what `grace-hooks squash` runs
    assert (done.name, done.n_packs, done.n_edits) == ("merged", 3, sum(em.pack(n).n_edits for n in ("b0", "b1", "b2")))
    assert done.bytes_after == load_pack(tmp_path / "merged").nbytes <= done.bytes_before  # router gate: keys kept
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != LOCK_NAME) == ["merged"]
    fresh = EditableModel(make_model("llama"), tokenizer, name="tiny")
    fresh.load_adapters(tmp_path)
    assert _same(last_logits(fresh, tokenizer, PROBES), chain)


def test_squash_refuses_what_is_not_one_chain(make_model, tokenizer, tmp_path):
    em = _chain(make_model, tokenizer, "router", n=2)
    em.edit(BATCHES[2], method="comeba_hk", pack="z", gate="zscore", **DELTA_TINY)
    em.edit([EditRequest(prompt="the capital of {}", subject="gondor", target_new="rome")], method="memit", pack="m",
            **DELTA_TINY)
    with pytest.raises(PackError, match="gate"):
        em.squash_packs(["b1", "z"], into="x")
    with pytest.raises(PackError, match="order it was loaded"):
        em.squash_packs(["b1", "b0"], into="x")
    with pytest.raises(ConfigError, match="cannot squash"):
        get_method("grace").squash([em.pack("m"), em.pack("m")], "x")  # weight deltas squash since issue 37
    with pytest.raises(PackError, match="comeba_hk packs only"):
        em.squash_packs(["z", "m"], into="x")
    with pytest.raises(PackError, match="at least two"):
        squash_packs([em.pack("b0")], "x")
    assert [p.name for p in em.packs] == ["b0", "b1", "z", "m"]  # nothing changed
    for name in ("b0", "b1"):
        em.save_pack(name, tmp_path)
    bad = CliRunner().invoke(main, ["squash", "b1", "b0", "--into", "x", "--adapters", str(tmp_path)])
    assert bad.exit_code == 2 and "oldest first" in bad.output
    missing = CliRunner().invoke(main, ["squash", "b0", "nope", "--into", "x", "--adapters", str(tmp_path)])
    assert missing.exit_code == 2 and "no pack named 'nope'" in missing.output


def test_bad_gate_is_refused(make_model, tokenizer):
    em = EditableModel(make_model("llama"), tokenizer)
    with pytest.raises(ConfigError, match="gate"):
        em.edit(BATCHES[0], method="comeba_hk", gate="sometimes", **DELTA_TINY)
    assert count_hooks(em.base_model) == 0


def test_health_reports_the_hook_layers_norm(make_model, tokenizer):
    em = _chain(make_model, tokenizer, "router", n=2)
    report = em.health(UNRELATED)
    for site, figures in report.items():
        w0 = Site.parse(site).weight(em.base_model).detach().double()
        w_h = w0 + sum(hook_increment(em.pack(p).site_tensors(site)).matrix() for p in ("b0", "b1"))
        assert figures["weight_norm_ratio"] == pytest.approx(1.0)  # nothing global
        assert figures["weight_norm_ratio_all"] == pytest.approx(float(w_h.norm() / w0.norm()))
        assert figures["weight_norm_ratio_all"] != pytest.approx(1.0)
