"""Synthetic facts for measuring the system at scale (issue 37): there are not 100,000 real records,
and what the system costs (router, memory, loading, generation) does not need them.

Each fact has a made-up subject of two or three made-up words (several tokens each), a relation of
the CounterFact table (``grace_hooks.questions``) written in one of its cloze templates, a made-up
target, and, for evaluation, the same fact in another of the relation's templates (``rephrase_prompt``)
where the relation has two. The same ``seed`` gives the same facts; subjects never repeat, and no
subject is a word of another (so one fact's subject never names another's).
"""
from __future__ import annotations

import random
from typing import Iterator

from ..questions import counterfact_table
from ..requests import EditRequest

ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kl", "l", "m", "n", "p", "pr", "r", "s", "st", "t", "tr", "v", "z")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ea")
CODAS = ("", "n", "r", "l", "s", "th", "nd", "rk", "x")


def made_up_word(rng: random.Random, syllables: int) -> str:
    """A pronounceable word that is no English word: ``syllables`` onset-vowel-coda parts, capitalised."""
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables)).capitalize()


def cloze_templates(relation) -> list[str]:
    """The relation's templates that read as a cloze with the subject before the answer."""
    return [t for t in relation.templates if not t.rstrip().endswith("{}")]


def synthetic_facts(n: int, seed: int = 0) -> list[EditRequest]:
    """``n`` made-up facts (see the module's text), ``case_id`` ``synthetic-<seed>-<i>``."""
    return list(_facts(n, seed))


def _facts(n: int, seed: int) -> Iterator[EditRequest]:
    rng = random.Random(seed)
    relations = [r for r in counterfact_table().relations if cloze_templates(r)]
    words: set[str] = set()
    made = 0
    while made < n:
        parts = [made_up_word(rng, rng.choice((2, 3))) for _ in range(rng.choice((2, 2, 3)))]
        if any(p in words for p in parts):  # a word shared by two subjects would let one name the other
            continue
        words.update(parts)
        relation = rng.choice(relations)
        templates = cloze_templates(relation)
        prompt, *others = rng.sample(templates, min(2, len(templates)))
        yield EditRequest(prompt=prompt, subject=" ".join(parts), target_new=made_up_word(rng, 2),
                          rephrase_prompt=others[0].replace("{}", " ".join(parts)) if others else None,
                          case_id=f"synthetic-{seed}-{made}")
        made += 1


__all__ = ["made_up_word", "synthetic_facts"]
