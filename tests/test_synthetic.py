"""Synthetic facts for the scale runs: the same for a seed, distinct subjects that share no word,
prompts of the CounterFact relation table and usable as edit requests."""
from grace_hooks.eval.synthetic import synthetic_facts
from grace_hooks.questions import counterfact_table


def test_synthetic_facts_are_reproducible_distinct_and_of_known_relations():
    facts = synthetic_facts(2000, seed=3)
    assert facts == synthetic_facts(2000, seed=3) and facts != synthetic_facts(2000, seed=4)
    subjects = [f.subject for f in facts]
    assert len(set(subjects)) == len(facts)
    words = [w for s in subjects for w in s.split()]
    assert len(set(words)) == len(words)  # no subject's word is in another subject
    table = counterfact_table()
    for f in facts[:300]:
        f.validate()
        relation = table.relation_of(f.text, f.subject)
        assert relation is not None and "{}" in f.prompt
        if f.rephrase_prompt:
            assert table.relation_of(f.rephrase_prompt, f.subject) == relation and f.rephrase_prompt != f.text
    assert sum(f.rephrase_prompt is not None for f in facts) > 0.9 * len(facts)
