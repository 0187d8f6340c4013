"""The FAISS router against the pure-torch reference, and its stacking rules."""
import numpy as np
import pytest
import torch

from grace_hooks.engine.router import NO_KEY, KeyRouter, exact_assign


def _setup(seed=0, n_keys=40, dim=16):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n_keys, dim, generator=g)
    radii = torch.rand(n_keys, generator=g) * 2.0 + 0.5
    rank = torch.randint(0, 4, (n_keys,), generator=g)
    return keys, radii, rank


@pytest.mark.parametrize("seed", range(3))
def test_faiss_agrees_with_exact_search(seed):
    keys, radii, rank = _setup(seed)
    router = KeyRouter(keys.shape[1])
    for r in rank.unique().tolist():  # one add per "pack"
        sel = (rank == r).nonzero().squeeze(1)
        ids = router.add(keys[sel].numpy(), radii[sel].numpy(), rank=r)
        assert list(ids) == list(range(ids[0], ids[0] + len(sel)))
    # router ids follow insertion order, map them back to original key indices
    order = torch.cat([(rank == r).nonzero().squeeze(1) for r in rank.unique().tolist()])
    g = torch.Generator().manual_seed(100 + seed)
    queries = torch.cat([keys + 0.3 * torch.randn(keys.shape, generator=g), torch.randn(200, keys.shape[1], generator=g) * 2])
    got = router.assign(queries.numpy())
    got = np.where(got == NO_KEY, NO_KEY, order.numpy()[np.maximum(got, 0)])
    want = exact_assign(queries, keys, radii, rank).numpy()
    dist = torch.cdist(queries.double(), keys.double())
    near_boundary = ((dist - radii.double()[None]).abs() < 1e-4).any(1).numpy()
    assert (got[~near_boundary] == want[~near_boundary]).all()
    assert (want != NO_KEY).sum() >= 10 and (want == NO_KEY).sum() >= 10  # both outcomes exercised


def test_newest_wins_then_nearest_and_removal():
    router = KeyRouter(2)
    old = router.add(np.array([[0.0, 0.0], [0.2, 0.0]], np.float32), np.array([1.0, 1.0]), rank=1)
    new = router.add(np.array([[0.5, 0.0]], np.float32), np.array([1.0]), rank=2)
    q = np.array([[0.1, 0.0], [-0.9, 0.0], [5.0, 5.0]], np.float32)
    assert router.assign(q).tolist() == [new[0], old[0], NO_KEY]
    router.remove(new)
    assert router.assign(q).tolist() == [old[0], old[0], NO_KEY]  # nearest of the remaining pack
    router.remove(old)
    assert len(router) == 0 and router.assign(q).tolist() == [NO_KEY] * 3


def test_radius_shrink_is_owned_and_undone():
    router = KeyRouter(1)
    (k,) = router.add(np.array([[0.0]], np.float32), np.array([2.0]), rank=1)
    q = np.array([[1.5]], np.float32)
    assert router.assign(q).tolist() == [k]
    router.shrink(k, 1.0, owner="later-pack")
    assert router.assign(q).tolist() == [NO_KEY]
    router.drop_overrides("later-pack")
    assert router.assign(q).tolist() == [k]


def test_last_only_keys_match_only_last_positions():
    router = KeyRouter(1)
    (k,) = router.add(np.array([[0.0]], np.float32), np.array([1.0]), rank=1, last_only=True)
    q = np.array([[0.0], [0.0]], np.float32)
    assert router.assign(q, is_last=np.array([False, True])).tolist() == [NO_KEY, k]


def test_nearest_on_empty_router():
    dist, ids = KeyRouter(3).nearest(np.zeros((2, 3), np.float32))
    assert np.isinf(dist).all() and (ids == NO_KEY).all()
