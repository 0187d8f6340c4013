"""Property: whatever a pack on disk holds, loading it is rejected cleanly or accepted and sane
(invariants 6 and 8). A few hundred mutants here; benchmarks/pack_fuzz.py runs 10,000."""
import random
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grace_hooks.testing import DELTA_REQUESTS, DELTA_TINY, TINY_REQUESTS
from grace_hooks.testing.pack_mutations import SOURCES, build_sources, collapse_one, mutant, outcome, read


@pytest.fixture(scope="module")
def fuzz_setup(tmp_path_factory):
    from grace_hooks.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    folder = tmp_path_factory.mktemp("sources")
    em, paths, ctx = build_sources(tiny_model("llama"), tok, folder, TINY_REQUESTS, DELTA_REQUESTS, DELTA_TINY)
    return em, tok, paths, ctx, tmp_path_factory.mktemp("mutants")


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(source=st.sampled_from(sorted(SOURCES)), seed=st.integers(0, 2**32 - 1), via=st.sampled_from(["load_pack", "load_adapters"]))
def test_mutated_pack_is_rejected_cleanly_or_accepted_and_sane(fuzz_setup, source, seed, via):
    em, tok, paths, ctx, workdir = fuzz_setup
    folder, what = mutant(random.Random(seed), paths[source], workdir / "m", ctx)
    result, detail = outcome(em, tok, folder, via)
    assert result != "other", f"{source} mutated by {what} (seed {seed}, {via}): {detail}"


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_every_tensor_collapsed_below_its_declared_rank_is_rejected_cleanly(fuzz_setup, source, rank):
    """Each tensor of each family, as a scalar or a vector where more dimensions are declared (a 0-d
    ``route_keys`` once reached a method's state check and raised a raw TypeError)."""
    em, tok, paths, _, workdir = fuzz_setup
    _, tensors = read(paths[source])
    for name in sorted(tensors):
        for via in ("load_pack", "load_adapters"):
            folder = workdir / "collapsed" / paths[source].name
            shutil.rmtree(folder.parent, ignore_errors=True)
            shutil.copytree(paths[source], folder)
            collapse_one(folder, name, rank)
            result, detail = outcome(em, tok, folder, via)
            if tensors[name].dim() > rank:  # below its declared rank: never loads
                assert result == "rejected", f"{source}: {name} collapsed to rank {rank} ({via}): {result}, {detail}"
            assert result != "other", f"{source}: {name} collapsed to rank {rank} ({via}): {detail}"
