"""What a method gets of the edited model while it computes (issue 36, "views enforced by types"):
views that read what is loaded and cannot change it, and an edit context that holds no runtime.

Every write a method could try through what it is given (setting a field of a view, writing an
array or a tensor a view returned) either raises or changes a copy: the loaded packs act exactly as
before, bit for bit."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import UNRELATED, last_logits
from grace_hooks import EditableModel
from grace_hooks.engine.effects import EffectLayer
from grace_hooks.engine.loaded import EditControls, LayerView, LoadedSite, LoadedView
from grace_hooks.engine.runtime import EditRuntime, SiteRuntime
from grace_hooks.methods.comeba.hook_layer import HookLayerView
from grace_hooks.methods.delta.effect import DeltaLayerView
from grace_hooks.methods.grace.effect import ReplacementsView
from grace_hooks.testing import DELTA_REQUESTS, DELTA_TINY, TINY_REQUESTS

PROBES = [r.text for r in TINY_REQUESTS + DELTA_REQUESTS] + UNRELATED[:2]
VIEWS = (ReplacementsView, DeltaLayerView, HookLayerView)


@pytest.fixture(scope="module")
def loaded():
    """A tiny llama with a GRACE, an ENCORE (routed) and a COMEBA-HK (z-score gate) pack loaded."""
    from grace_hooks.testing import tiny_model, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    em = EditableModel(tiny_model("llama"), tokenizer, name="tiny")
    em.edit(TINY_REQUESTS[:1], method="grace", pack="g")
    em.edit(DELTA_REQUESTS[:1], method="encore", pack="e", **DELTA_TINY)
    em.edit(DELTA_REQUESTS[1:2], method="comeba_hk", pack="c", gate="zscore", **DELTA_TINY)
    yield em, tokenizer
    em.close()


def _tensors(em: EditableModel) -> dict[str, torch.Tensor]:
    return {f"{p.name}/{s}/{k}": v.clone() for p in em.packs for s in p.sites
            for k, v in em.pack(p.name).site_tensors(s).items()}


def test_each_family_reads_what_it_needs_through_its_view(loaded):
    em, _ = loaded
    found = {cls: [n for n in em.loaded.sites if em.loaded.site(n).view(cls) is not None] for cls in VIEWS}
    assert all(found.values()), found  # every family is loaded somewhere
    # the public surface of a view is the reads its method needs, and nothing that is the layer
    assert {n for n in dir(ReplacementsView) if not n.startswith("_")} == {"of", "value"}
    assert {n for n in dir(DeltaLayerView) if not n.startswith("_")} == {"of", "factors"}
    assert {n for n in dir(HookLayerView) if not n.startswith("_")} == {"of", "alpha", "absorbed_keys", "change"}
    assert not hasattr(LoadedSite, "layer")  # the live effect layer is not handed out any more
    site = em.loaded.site(found[HookLayerView][0])
    hook = site.view(HookLayerView)
    assert isinstance(hook.alpha, float)
    keys = em.pack("c").site_tensors(site.name)["keys"]
    assert torch.equal(hook.absorbed_keys(), keys)
    delta = em.loaded.site(found[DeltaLayerView][0]).view(DeltaLayerView)
    assert delta.factors("V").dtype == torch.float64 and delta.factors("keys").shape[0] == keys.shape[1]


def test_a_method_cannot_change_what_is_loaded_through_what_it_is_given(loaded):
    em, tokenizer = loaded
    before = last_logits(em, tokenizer, PROBES)
    tensors = _tensors(em)
    with em.edit_context() as ctx:
        # the context holds no runtime, site runtime or effect layer: only views, the four calls, the model ...
        held = vars(ctx).values()
        assert not any(isinstance(v, (EditRuntime, SiteRuntime, EffectLayer)) for v in held)
        assert isinstance(ctx.loaded, LoadedView) and any(isinstance(v, EditControls) for v in held)
        with pytest.raises(dataclasses.FrozenInstanceError):
            ctx.loaded._runtime = None
        for name in ctx.loaded.sites:
            site = ctx.loaded.site(name)
            with pytest.raises(dataclasses.FrozenInstanceError):
                site._rt = None
            # router reads come back read-only
            dist, ids = site.nearest(_queries(em, name))
            arrays = (dist, ids, site.radius(ids)) if site.n_keys else (dist, ids)
            for array in arrays:
                with pytest.raises(ValueError, match="read-only"):
                    array[...] = 0
            for cls in VIEWS:
                view = site.view(cls)
                if view is None:
                    continue
                assert isinstance(view, LayerView)
                with pytest.raises(dataclasses.FrozenInstanceError):
                    view._layer = None
                with pytest.raises(dataclasses.FrozenInstanceError):
                    view.extra = 1
                # what a view returns is the method's own: writing it changes nothing loaded
                for read in _reads(view, site, ids, em.pack("g").pack_id):
                    first = read().clone()
                    read().add_(1.0)
                    assert torch.equal(read(), first)
    assert all(torch.equal(a, b) for a, b in zip(last_logits(em, tokenizer, PROBES), before))
    after = _tensors(em)
    assert after.keys() == tensors.keys() and all(torch.equal(after[k], tensors[k]) for k in tensors)


def _queries(em: EditableModel, site: str) -> np.ndarray:
    """The router keys of the GRACE pack where it edits (its keys are the nearest), else a zero query."""
    pack = em.pack("g")
    if site in pack.sites:
        return pack.site_tensors(site)["keys"].numpy()
    return np.zeros((1, em.loaded.site(site).dims[0]), dtype=np.float32)


def _reads(view: LayerView, site: LoadedSite, ids: np.ndarray, grace_pack: str) -> list:
    """Every tensor-returning read of a built-in family's view, as calls without arguments."""
    if isinstance(view, ReplacementsView):
        key_id = int(ids[0])
        where = site.key_pack(key_id)
        assert where is not None and where[0] == grace_pack  # a key of the GRACE pack: its value is read
        assert bool(view.value(key_id, where[0]).any())
        return [lambda: view.value(key_id, where[0])]
    if isinstance(view, DeltaLayerView):
        return [lambda: view.factors("V"), lambda: view.factors("keys")]
    x = torch.randn(2, 3, site.dims[0], generator=torch.Generator().manual_seed(0))
    return [view.absorbed_keys, lambda: view.change(x)]
