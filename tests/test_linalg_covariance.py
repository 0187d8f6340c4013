"""Shared maths for weight-delta methods: closed-form updates, projections, key second moments."""
import importlib.util
import re
from pathlib import Path

import pytest
import torch

from grace_hooks.bases.architectures import Site
from grace_hooks.locate.covariance import Corpus, sample_corpus, second_moment, second_moments, site_inputs
from grace_hooks.locate.linalg import (Preservation, PreservationTerms, closed_form_update, fixed_part,
                                      orthonormal_basis, preservation_matrix, project_out)

TEXTS = ("the cat sat on the mat", "the quick brown fox jumps over the lazy dog", "alice speaks french",
         "the capital of narnia is tokyo", "bob plays chess in the park")


def test_factors_equal_the_closed_form():
    torch.manual_seed(0)
    d_out, d_in, n = 7, 5, 3
    r, k = torch.randn(d_out, n), torch.randn(d_in, n)
    a = torch.randn(d_in, d_in)
    c0 = a @ a.T / d_in
    prev = torch.randn(d_in, 2)
    p = preservation_matrix(d_in, c0, lam=2.0, lam_identity=0.5, previous_keys=prev)
    upd = closed_form_update(r, k, p)
    r64, k64 = r.double(), k.double()
    expected = r64 @ k64.T @ torch.linalg.inv(2.0 * c0.double() + 0.5 * torch.eye(d_in, dtype=torch.float64)
                                               + prev.double() @ prev.double().T + k64 @ k64.T)
    assert upd.dense().dtype == torch.float64 and upd.rank == n
    assert torch.allclose(upd.dense(), expected, atol=1e-10)


@pytest.mark.parametrize("n_previous", [0, 2, 40])  # 40 earlier keys in 12 dimensions: the dense solve
@pytest.mark.parametrize("identity", [0.5, 0.0])
def test_a_factored_preservation_solves_as_the_dense_matrix(n_previous, identity):
    torch.manual_seed(2)
    d_in, n = 12, 3
    a = torch.randn(d_in, 30)
    c0, r, k = (a @ a.T / 30).double(), torch.randn(9, n), torch.randn(d_in, n)
    prev = torch.randn(d_in, n_previous) if n_previous else None
    terms = PreservationTerms(2.0, identity, prev)
    factored = closed_form_update(r, k, Preservation(fixed_part(terms, c0), prev))
    dense = closed_form_update(r, k, preservation_matrix(d_in, c0, 2.0, identity, prev))
    assert torch.allclose(factored.V, dense.V, rtol=1e-9, atol=1e-12)
    basis = orthonormal_basis(torch.randn(d_in, 2))  # a constraint takes the dense path with the same P
    assert torch.allclose(closed_form_update(r, k, Preservation(fixed_part(terms, c0), prev), basis).V,
                          closed_form_update(r, k, preservation_matrix(d_in, c0, 2.0, identity, prev), basis).V,
                          rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n_previous", [0, 3, 30])
@pytest.mark.parametrize("identity", [20.0, 0.0])
def test_c0_kept_as_rows_solves_as_its_matrix(n_previous, identity):
    """C0 measured on fewer tokens than dimensions, kept as its rows and solved through them (Woodbury),
    gives the update the dense matrix gives, with and without lambda_N and earlier keys."""
    torch.manual_seed(4)
    d_in, tokens, n = 40, 9, 3
    rows = torch.randn(tokens, d_in) * 3
    r, k = torch.randn(6, n), torch.randn(d_in, n)
    prev = torch.randn(d_in, n_previous) if n_previous else None
    terms = PreservationTerms(15.0, identity, prev)
    thin = fixed_part(terms, rows=rows)
    dense = fixed_part(terms, rows.double().T @ rows.double() / tokens)
    assert torch.allclose(thin.dense(), dense.dense(), rtol=1e-9, atol=1e-9)
    got = closed_form_update(r, k, Preservation(thin, prev)).V
    want = closed_form_update(r, k, Preservation(dense, prev)).V
    rtol = 1e-6 if identity else 1e-3  # without lambda_N both invert a 1e-9 ridge: condition ~1e9
    assert torch.allclose(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


def test_c0_from_fewer_tokens_than_dimensions_still_factors():
    keys = torch.randn(5, 16).double()  # rank 5 in 16 dimensions and no identity term: singular
    fixed = fixed_part(PreservationTerms(1.0), keys.T @ keys / 5)
    assert torch.isfinite(fixed.factor).all()
    v = Preservation(fixed).solve(torch.randn(16, 2))
    assert torch.isfinite(v).all()


def test_tiny_preservation_maps_keys_to_residuals():
    torch.manual_seed(1)
    r, k = torch.randn(6, 2), torch.randn(4, 2)
    upd = closed_form_update(r, k, preservation_matrix(4, torch.eye(4), lam=1e-9))
    assert torch.allclose(upd.dense() @ k.double(), r.double(), atol=1e-6)
    with pytest.raises(ValueError, match="columns"):
        closed_form_update(torch.randn(6, 3), k, torch.eye(4))


def test_projection_removes_the_earlier_subspace():
    torch.manual_seed(2)
    basis = orthonormal_basis(torch.randn(8, 3))
    assert torch.allclose(basis.T @ basis, torch.eye(3, dtype=torch.float64), atol=1e-12)
    v = project_out(torch.randn(8, 4), basis)
    assert torch.allclose(basis.T @ v, torch.zeros(3, 4, dtype=torch.float64), atol=1e-12)
    assert torch.equal(project_out(v, None), v)


def test_second_moment_matches_a_direct_computation_and_is_cached(make_model, tokenizer, tmp_path):
    model = make_model("llama")
    site = Site(1)
    corpus = Corpus(TEXTS, "test texts")
    got = second_moment(model, tokenizer, site, corpus, batch_size=2, cache=tmp_path)
    keys = []
    handle = site.module(model).register_forward_hook(lambda m, a, o: keys.append(a[0][0].detach()))
    with torch.no_grad():
        for t in TEXTS:
            model(**tokenizer(t, return_tensors="pt"))
    handle.remove()
    k = torch.cat(keys).double()
    assert got.count == len(k) and not got.from_cache
    assert torch.allclose(got.matrix, k.T @ k / len(k), atol=1e-4)  # float32 forwards, batched vs one by one
    again = second_moment(model, tokenizer, site, corpus, batch_size=2, cache=tmp_path)
    assert again.from_cache and torch.equal(again.matrix, got.matrix) and again.count == got.count
    other = second_moment(model, tokenizer, site, Corpus(TEXTS[:2], "fewer"), cache=tmp_path)
    assert not other.from_cache and other.count < got.count
    capped = second_moment(model, tokenizer, site, corpus, max_tokens=5, cache=False)
    assert capped.count == 5


def test_snapshots_on_the_way_equal_c0_measured_with_that_many_tokens(make_model, tokenizer, tmp_path):
    model, sites, corpus = make_model("llama"), [Site(0), Site(1)], Corpus(TEXTS, "test texts")
    full = second_moments(model, tokenizer, sites, corpus, batch_size=2, cache=tmp_path / "one", also_at=(7, 13, 10_000))
    for count in (7, 13):  # 7 falls inside the first batch, 13 inside a later one
        snap = second_moments(model, tokenizer, sites, corpus, max_tokens=count, batch_size=2, cache=tmp_path / "one")
        alone = second_moments(model, tokenizer, sites, corpus, max_tokens=count, batch_size=2, cache=tmp_path / "two")
        for site in sites:
            assert snap[site.name].from_cache and snap[site.name].count == count
            assert not alone[site.name].from_cache
            # the same tokens; a batch's products cut at a snapshot round differently in float32
            assert torch.allclose(snap[site.name].matrix, alone[site.name].matrix, rtol=1e-5, atol=1e-6)
    plain = second_moments(model, tokenizer, sites, corpus, batch_size=2, cache=False)
    assert all(torch.allclose(full[s.name].matrix, plain[s.name].matrix, atol=1e-6) for s in sites)
    assert len(list((tmp_path / "one").glob("*.safetensors"))) == 3 * len(sites)  # no snapshot past the corpus's end


def test_c0_over_fewer_tokens_than_dimensions_is_kept_as_its_rows(make_model, tokenizer, tmp_path):
    from grace_hooks.locate.covariance import thin_form

    model, sites, corpus = make_model("llama"), [Site(0), Site(1)], Corpus(TEXTS, "test texts")
    d_in = sites[0].dims(model)[0]
    few = 12
    assert thin_form(few, d_in) and not thin_form(d_in + 1, d_in)
    thin = second_moments(model, tokenizer, sites, corpus, max_tokens=few, batch_size=2, cache=tmp_path,
                          also_at=(5,))
    dense = second_moments(model, tokenizer, sites, corpus, max_tokens=d_in + 1, batch_size=2, cache=False)
    again = second_moments(model, tokenizer, sites, corpus, max_tokens=few, batch_size=2, cache=tmp_path)
    snap = second_moments(model, tokenizer, sites, corpus, max_tokens=5, batch_size=2, cache=tmp_path)
    for site in sites:
        got = thin[site.name]
        assert got.thin and got.rows.shape == (few, d_in) and got.count == few and not dense[site.name].thin
        assert again[site.name].from_cache and again[site.name].thin and torch.equal(again[site.name].rows, got.rows)
        assert snap[site.name].from_cache and torch.equal(snap[site.name].rows, got.rows[:5])
    inputs = site_inputs(model, tokenizer, sites, corpus.texts, few)  # the same tokens, one text per forward
    for site in sites:
        rows = thin[site.name].rows
        assert torch.allclose(rows, inputs[site.name], atol=1e-5)  # float32 forwards, batched vs one by one
        assert torch.allclose(thin[site.name].matrix, rows.double().T @ rows.double() / few)


def test_self_sampled_corpus_is_reproducible(make_model, tokenizer):
    model = make_model("llama")
    a = sample_corpus(model, tokenizer, n_texts=3, n_tokens=6, seed=3)
    b = sample_corpus(model, tokenizer, n_texts=3, n_tokens=6, seed=3)
    assert a == b and a.source.startswith("model-sampled") and len(a.texts) >= 1
    assert sample_corpus(model, tokenizer, n_texts=3, n_tokens=6, seed=4).digest != a.digest


def _benchmark(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_subspace_overlap_tells_orthogonal_packs_from_overlapping_ones():
    overlap = _benchmark("delta_subspace").site_overlap
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(40, 12, generator=g, dtype=torch.float64)).Q
    us = [torch.randn(7, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    orthogonal = overlap([(us[i], q[:, 4 * i:4 * i + 4] @ torch.randn(4, 4, generator=g, dtype=torch.float64))
                          for i in range(3)])
    assert orthogonal["ranks"] == orthogonal["span"] == 12 and orthogonal["d_in"] == 40
    assert orthogonal["in_earlier"] < 1e-10 and orthogonal["cos"] < 1e-10
    repeated = overlap([(us[0], q[:, :4]), (2 * us[0], q[:, :4]), (us[1], q[:, 4:8])])
    assert repeated["ranks"] == 12 and repeated["span"] == 8
    assert repeated["in_earlier"] == pytest.approx(1.0) and repeated["cos"] == pytest.approx(1.0)
    # q has orthonormal columns, so |U q^T|_F = |U|_F
    assert repeated["norm_first"] == pytest.approx(float(us[0].norm()))
    assert repeated["norm_last"] == pytest.approx(float(us[1].norm()))


def test_model_digest_follows_the_weights_not_where_they_were_loaded(make_model):
    from grace_hooks.locate.covariance import model_digest

    model = make_model("llama")
    before = model_digest(model)
    model.config.name_or_path = "/somewhere/else"
    model.config.transformers_version = "0.0.0"
    assert model_digest(model) == before
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1.0
    assert model_digest(model) != before


def test_corpus_comes_from_the_cache_then_the_shipped_folder_then_sampling(make_model, tokenizer, tmp_path, monkeypatch):
    import json

    import grace_hooks.locate.covariance as cov

    model = make_model("llama")
    name = "abc-seed0-n4-t8.json"
    shipped, cache = tmp_path / "shipped", tmp_path / "cache"
    shipped.mkdir()
    (shipped / name).write_text(json.dumps({"texts": ["the sun", "the cat"], "source": "model-sampled:shipped"}))
    monkeypatch.setattr(cov, "SHIPPED_CORPORA", str(shipped))  # an absolute folder replaces the package's
    calls = []
    real = cov.sample_corpus
    monkeypatch.setattr(cov, "sample_corpus", lambda *a, **k: calls.append(1) or real(*a, **k))

    got = cov.cached_sample_corpus(model, tokenizer, "abc", 4, 8, cache=cache)
    assert got.texts == ("the sun", "the cat") and got.source == "model-sampled:shipped" and not calls

    cache.mkdir()
    (cache / name).write_text('{"texts": [3], "source": "x"}')  # a bad cache file is not used
    assert cov.cached_sample_corpus(model, tokenizer, "abc", 4, 8, cache=cache).source == "model-sampled:shipped"
    (shipped / name).write_text("not json")  # nothing usable: the model samples, and the cache is repaired
    sampled = cov.cached_sample_corpus(model, tokenizer, "abc", 4, 8, cache=cache)
    assert calls == [1] and sampled.source.startswith("model-sampled:seed=0")
    assert json.loads((cache / name).read_text())["texts"] == list(sampled.texts)


def test_long_statistics_say_what_they_do_and_how_far_they_are_without_a_terminal(make_model, tokenizer, caplog):
    """Sampling the C0 corpus and measuring C0 take minutes on a real model: where no progress bar
    shows (no terminal), INFO lines say what runs, that it is once per model, each quarter, and the end."""
    import logging

    model = make_model("llama")
    with caplog.at_level(logging.INFO, logger="grace_hooks"):
        corpus = sample_corpus(model, tokenizer, n_texts=8, n_tokens=4, batch_size=2)
        second_moment(model, tokenizer, Site(1), Corpus(TEXTS * 4, "test texts"), batch_size=2, cache=False)
    text = caplog.text
    assert "once per model" in text and "sampled 8 texts in" in text and len(corpus.texts) > 0
    for quarter in ("25%", "50%", "75%"):
        assert f"C0 corpus: sampling texts from the model: {quarter}" in text and f"C0 at 1 site(s): {quarter}" in text
    assert "once per model and corpus" in text and re.search(r"covariance at \['L1.mlp_out'\]: \d+ keys each .* in \d+ s", text)


def test_a_c0_singular_beyond_the_first_ridge_still_factors():
    """A C0 of fewer tokens than dimensions, summed in float32, can have eigenvalues below -1e-9 of its
    diagonal: the ridge grows until the factor exists, and a C0 that is positive stays as it was."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    eig = torch.cat([torch.rand(8, dtype=torch.float64) + 1, torch.full((8,), -1e-6, dtype=torch.float64)])
    c0 = q @ torch.diag(eig) @ q.T
    assert int(torch.linalg.cholesky_ex(c0 + 1e-9 * c0.diagonal().mean() * torch.eye(16, dtype=torch.float64))[1])
    part = fixed_part(PreservationTerms(c0_weight=1.0), c0)
    k, r = torch.randn(16, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    assert torch.isfinite(closed_form_update(r, k, Preservation(part, None)).V).all()
    healthy = c0 + torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(fixed_part(PreservationTerms(c0_weight=1.0), healthy).factor, torch.linalg.cholesky(healthy))
