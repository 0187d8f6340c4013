"""The chat-form metric (grace_hooks.eval.chat) against hand-computed answers of a scripted model:
template applied, each stop rule, whole-word matching; and early stopping equal to cutting a long
greedy answer on a real (random) tiny model."""
import pytest
import torch

from grace_hooks import EditableModel
from grace_hooks.bases.hooks import HookOwner
from grace_hooks.eval.chat import chat_answers, chat_input, chat_success, natural_answer
from grace_hooks.eval.generation import greedy_batch
from grace_hooks.testing import tiny_model, tiny_tokenizer

# The scripted model's next token depends on the current token only (hand-computable greedy answers).
NEXT = {"?": "paris", "paris": "is", "is": "red", "red": ".", ".": "rome", "rome": "rome",  # a sentence, then more
        "plays": "chess", "chess": "[EOS]",  # ends at EOS
        "tennis": "tennis"}  # never stops: the cap ends it
DEFAULT_NEXT = "the"
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} ?{% endif %}"


@pytest.fixture
def templated_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def scripted(tokenizer) -> EditableModel:
    em = EditableModel(tiny_model("llama"), tokenizer, name="tiny-scripted")
    table = torch.full((len(tokenizer),), tokenizer.convert_tokens_to_ids(DEFAULT_NEXT))
    for a, b in NEXT.items():
        table[tokenizer.convert_tokens_to_ids(a)] = tokenizer.convert_tokens_to_ids(b)
    fed = {}
    owner = HookOwner()
    owner.pre_forward(em.base_model, lambda m, args, kwargs: fed.update(ids=kwargs["input_ids"]), with_kwargs=True)

    def forced(module, args, logits):
        out = torch.full_like(logits, -1e4)
        ids = fed["ids"][:, -logits.shape[1]:]  # generate asks for the last position's logits only
        return out.scatter(-1, table[ids][..., None], 0.0)

    owner.forward(em.base_model.get_output_embeddings(), forced)
    return em


def test_natural_answer_hand_cases():
    assert natural_answer("  Paris is big. It is old") == "Paris is big."
    assert natural_answer("\nRome\nand more") == "Rome"
    assert natural_answer("What? No") == "What?"
    assert natural_answer("about 3.5 km away") == "about 3.5 km away"  # a full stop inside a number is no sentence end
    assert natural_answer("St. Louis") == "St."  # the plain rule: said in the module docstring


def test_whole_word_match():
    assert chat_success(["It is Zorbatown."], ["Zorbatown"]) == [True]
    assert chat_success(["Zorbatownownown"], ["Zorbatown"]) == [False]  # the runaway answer of issue 18
    assert chat_success(["in zorbatown, of course"], [" Zorbatown "]) == [True]  # case and spaces ignored
    assert chat_success(["Parisian food"], ["Paris"]) == [False]


def test_chat_input_uses_the_template_when_there_is_one(tokenizer, templated_tokenizer):
    assert chat_input(tokenizer, "who is alice") == ("who is alice", False)
    assert chat_input(templated_tokenizer, "who is alice") == ("who is alice ?", True)


def test_scripted_answers_stop_where_the_rules_say(tokenizer, templated_tokenizer):
    em = scripted(templated_tokenizer)
    # the template ends the question with '?': a sentence, cut after its full stop
    assert chat_answers(em, ["who is alice"], max_new_tokens=12) == ["paris is red ."]
    plain = scripted(tokenizer)
    assert chat_answers(plain, ["alice plays", "bob likes tennis"], max_new_tokens=5) == ["chess", "tennis tennis tennis tennis tennis"]
    # without the template the same question is answered from its own last token
    assert chat_answers(plain, ["who is alice"], max_new_tokens=3) == ["the the the"]


def test_early_stop_equals_cutting_a_long_answer(templated_tokenizer):
    em = EditableModel(tiny_model("llama", seed=3), templated_tokenizer, name="tiny")
    questions = ["who is alice", "the capital of rome is", "what does bob play"]
    short = chat_answers(em, questions, max_new_tokens=24, batch_size=2)
    rendered = [chat_input(templated_tokenizer, q)[0] for q in questions]
    long = greedy_batch(em, rendered, 24, batch_size=1, special_tokens=False)
    assert short == [natural_answer(a) for a in long]
