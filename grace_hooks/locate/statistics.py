"""What locate-then-edit methods measure on the base model, made once per weight version.

The model's digest, its context prefixes, the C0 corpus, C0 at the edited sites and the site inputs
of a corpus probe depend only on the base weights (never on the loaded packs: they are measured with
the packs off), so they live in the model's :class:`~grace_hooks.engine.memo.WeightMemo` under its one
invalidation rule; C0 and model-sampled corpora are also kept on disk, keyed by content.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..bases.architectures import Site
from ..engine.memo import WeightMemo
from .covariance import Corpus, SecondMoment, cached_sample_corpus, model_digest, second_moments, site_inputs
from .subject_keys import context_prefixes


@dataclass(frozen=True)
class CorpusSpec:
    """Where C0's text comes from: a file of paragraphs, or ``texts`` texts of ``tokens`` tokens the
    model samples itself (no pre-training text offline)."""

    path: str | None = None
    texts: int = 256
    tokens: int = 128


class Statistics:
    """The measurements of one model (``packs_off``: a block where no loaded pack acts)."""

    def __init__(self, model, tokenizer, memo: WeightMemo,
                 packs_off: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        self.model, self.tokenizer, self.memo, self._packs_off = model, tokenizer, memo, packs_off

    def digest(self) -> str:
        """:func:`~grace_hooks.locate.covariance.model_digest` (what the disk caches are keyed by)."""
        return self.memo.get(("model_digest",), lambda: model_digest(self.model))

    def prefixes(self, n_tokens: int, seed: int = 0) -> list[str]:
        """``""`` plus the model-written context prefixes (the base model's own writing), kept on disk
        by the weights' digest (shipped for the embedded models)."""
        with self._packs_off():
            return context_prefixes(self.model, self.tokenizer, n_tokens, seed, memo=self.memo,
                                    model_hash=self.digest())

    def corpus(self, spec: CorpusSpec) -> Corpus:
        if spec.path is not None:
            return Corpus.from_file(Path(spec.path))
        return self.memo.get(("corpus", spec.texts, spec.tokens), lambda: cached_sample_corpus(
            self.model, self.tokenizer, self.digest(), spec.texts, spec.tokens))

    def second_moments(self, sites: list[Site], spec: CorpusSpec, max_tokens: int) -> dict[str, SecondMoment]:
        """C0 at each site (from the disk cache when it is there); ``from_cache`` says how the first
        call got it."""
        def make():
            with self._packs_off():
                return second_moments(self.model, self.tokenizer, sites, self.corpus(spec), max_tokens,
                                      model_hash=self.digest())
        return self.memo.get(("C0", tuple(s.name for s in sites), spec, max_tokens), make)

    def probe(self, sites: list[Site], spec: CorpusSpec, n_tokens: int) -> dict[str, torch.Tensor]:
        """Site inputs of the base model at the first ``n_tokens`` tokens of the corpus."""
        def make():
            with self._packs_off():
                return site_inputs(self.model, self.tokenizer, sites, self.corpus(spec).texts, n_tokens)
        return self.memo.get(("probe", tuple(s.name for s in sites), spec, n_tokens), make)


__all__ = ["CorpusSpec", "Statistics"]
