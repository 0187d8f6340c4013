"""Property: whatever a pack on disk holds, loading it is rejected cleanly or accepted and sane
(invariants 6 and 8). A few hundred mutants here; benchmarks/pack_fuzz.py runs 10,000."""
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DELTA_REQUESTS, DELTA_TINY, TINY_REQUESTS
from pack_mutations import SOURCES, build_sources, mutant, outcome


@pytest.fixture(scope="module")
def fuzz_setup(tmp_path_factory):
    from tiny import tiny_model, tiny_tokenizer

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
