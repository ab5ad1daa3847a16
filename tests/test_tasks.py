"""Task generators, splits, and the task loss measured on models with known logits."""

from __future__ import annotations

import math

import pytest
import torch

from circuitir.errors import UserError
from circuitir.models.tokenizer import ByteTokenizer
from circuitir.tasks import TASKS, get_task, split_of
from circuitir.tasks.evaluate import encode_examples, evaluate_model

from conftest import tiny_config

TOKENIZER = ByteTokenizer()
TASK_NAMES = sorted(TASKS)
N = 300


def test_the_papers_tasks_are_registered():
    assert {"single_double_quote", "bracket_counting", "set_or_string", "set_or_string_fixedvarname",
            "while_return_true", "else_elif"} <= set(TASKS)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_answers_differ_in_their_first_token(name):
    for split in ("train", "heldout"):
        for example in TASKS[name].examples(split, N, seed=0):
            correct, alternative = TOKENIZER.encode(example.correct), TOKENIZER.encode(example.alternative)
            assert correct and alternative
            assert correct[0] != alternative[0], example


@pytest.mark.parametrize("name", TASK_NAMES)
def test_splits_are_disjoint_and_deterministic(name):
    task = TASKS[name]
    train = task.examples("train", N, seed=0)
    heldout = task.examples("heldout", N, seed=0)
    assert len(train) == len(heldout) == N
    assert len({e.prompt for e in train}) == N and len({e.prompt for e in heldout}) == N  # distinct
    # Disjoint even across seeds: membership is a property of the prompt text.
    heldout_other_seed = task.examples("heldout", N, seed=7)
    assert not {e.prompt for e in train} & ({e.prompt for e in heldout} | {e.prompt for e in heldout_other_seed})
    assert all(split_of(e.prompt) == "train" for e in train)
    assert all(split_of(e.prompt) == "heldout" for e in heldout)
    assert task.examples("heldout", N, seed=0) == heldout
    assert task.examples("train", N, seed=0) == train
    assert heldout_other_seed != heldout


@pytest.mark.parametrize("name", TASK_NAMES)
def test_both_answers_occur_and_pairs_are_contrastive(name):
    examples = TASKS[name].examples("heldout", N, seed=0)
    answers = {e.correct for e in examples}
    assert len(answers) == 2
    assert {e.alternative for e in examples} == answers
    for example in examples:
        assert example.correct != example.alternative


def test_aliases():
    assert get_task("quotes") is TASKS["single_double_quote"]
    assert get_task("brackets") is TASKS["bracket_counting"]
    assert get_task("else_elif") is TASKS["else_elif"]
    with pytest.raises(UserError, match="unknown task 'nope'"):
        get_task("nope")


def test_unknown_split_is_a_user_error():
    with pytest.raises(UserError, match="split"):
        TASKS["else_elif"].examples("test", 4)


def test_quote_task_closes_with_the_opening_quote():
    for example in TASKS["single_double_quote"].examples("heldout", 50):
        opening = example.prompt.rsplit(" = ", 1)[1][0]
        assert example.correct == opening


# ---------------------------------------------------------------- task loss on known logits

def zero_model(**config):
    """Every weight zero: the logits are exactly final_logits_bias + bigram_table[token]."""
    from circuitir.models.gpt import SparseGPT

    model = SparseGPT(tiny_config(block_size=128, **config))
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.zero_()
    return model.eval()


@pytest.mark.parametrize("margin", [0.0, 0.7, 3.0])
def test_loss_and_accuracy_when_the_correct_token_wins_by_a_margin(margin):
    """else_elif: `else` ends in `e` and wants `:`, `elif` ends in `f` and wants a space."""
    model = zero_model(enable_bigram_table=True)
    with torch.no_grad():
        model.bigram_table[ord("e"), ord(":")] = margin
        model.bigram_table[ord("f"), ord(" ")] = margin
        model.bigram_table[ord("e"), ord("x")] = 50.0  # other tokens do not enter the binary loss
    result = evaluate_model(model, TASKS["else_elif"], TOKENIZER, "heldout", n=64)
    assert result["n"] == 64 and result["task"] == "else_elif"
    assert result["loss"] == pytest.approx(math.log1p(math.exp(-margin)), abs=1e-6)
    assert result["accuracy"] == (1.0 if margin > 0 else 0.0)  # a tie is not a correct answer


@pytest.mark.parametrize("margin", [0.5, 2.0])
def test_loss_when_one_answer_is_always_preferred(margin):
    """A constant preference for `"`: right on the double-quote prompts, wrong on the others."""
    model = zero_model()
    with torch.no_grad():
        model.final_logits_bias[ord('"')] = margin
    task = TASKS["single_double_quote"]
    examples = task.examples("heldout", 101, seed=3)
    share = sum(e.correct == '"' for e in examples) / len(examples)
    assert 0 < share < 1
    result = evaluate_model(model, task, TOKENIZER, "heldout", n=101, seed=3)
    expected = share * math.log1p(math.exp(-margin)) + (1 - share) * math.log1p(math.exp(margin))
    assert result["loss"] == pytest.approx(expected, abs=1e-6)
    assert result["accuracy"] == pytest.approx(share)


def test_evaluation_does_not_depend_on_batching_or_padding(make_model):
    model = make_model(seed=1, block_size=128)
    task = TASKS["bracket_counting"]
    whole = evaluate_model(model, task, TOKENIZER, n=40, batch_size=256)
    pieces = evaluate_model(model, task, TOKENIZER, n=40, batch_size=7)
    assert pieces["loss"] == pytest.approx(whole["loss"], abs=1e-6)
    assert pieces["accuracy"] == whole["accuracy"]
    # The same number from scoring each prompt alone, unpadded.
    examples = task.examples("heldout", 40)
    losses = []
    with torch.no_grad():
        for example in examples:
            logits = model(torch.tensor([TOKENIZER.encode(example.prompt)]))[0, -1]
            pair = torch.stack([logits[ord(example.correct[0])], logits[ord(example.alternative[0])]])
            losses.append(float(-torch.log_softmax(pair, 0)[0]))
    assert whole["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-5)


def test_prompt_longer_than_context_is_a_user_error():
    examples = TASKS["else_elif"].examples("heldout", 4)
    with pytest.raises(UserError, match="longer than the model's context"):
        encode_examples(TASKS["else_elif"], examples, TOKENIZER, block_size=4)
