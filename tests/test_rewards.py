"""Reward functions (runner.rewards) on hand-made answers, and the Judge that combines them: weights, per-term scores,
and the errors that stop a run instead of scoring a broken answer 0."""

import pytest
import torch
from omegaconf import OmegaConf

from runner import rewards
from runner.rewards import common, math as math_reward, tiny
from runner.rewards.judge import Judge, RewardError
from tests.helpers import CONF, TINY_TOKENIZER


def test_tiny_ground_truth_scores_format_and_positive_share():
    answers = [
        "the boat was lovely and great .",  # well-formed, all positive: 1 + 1
        "the boat was lovely and awful .",  # well-formed, half positive: 1 + 0.5
        "the boat was awful and rude .",  # well-formed, negative: 1 + 0
        "lovely lovely awful",  # no format, 2 of 3 positive
        "the the the",  # nothing
    ]
    assert tiny.ground_truth([""] * 5, answers) == pytest.approx([2.0, 1.5, 1.0, 2 / 3, 0.0])


@pytest.mark.parametrize(
    "text, final",
    [
        ("so she has 3 + 4 = 7 apples.\n#### 7", "7"),
        ("The answer is \\boxed{\\frac{1}{2}} here", "\\frac{1}{2}"),
        ("first 12 then 1,250 left", "1250"),
        ("no number at all", None),
    ],
)
def test_final_answer(text, final):
    assert math_reward.final_answer(text) == final


def test_answer_matches_compares_values_not_strings():
    rows = [{"reference": "Natalia sold 48/2 = 24 clips.\n#### 72"}] * 3 + [{"reference": "#### 0.5"}]
    answers = ["48 + 24 = 72\n#### 72", "#### 72.0", "#### 71", "\\boxed{\\frac{1}{2}}"]
    assert math_reward.answer_matches([""] * 4, answers, rows) == [1.0, 1.0, 0.0, 1.0]


def test_answer_matches_needs_the_reference_field():
    with pytest.raises(ValueError, match="data.sets.<name>.fields.reference"):
        math_reward.answer_matches(["q"], ["#### 1"], [{"answer": "1"}])


def test_format_and_length_terms():
    assert common.format_regex([""] * 2, ["x\n#### 5", "five"], pattern=r".*####\s*\d+") == [1.0, 0.0]
    assert common.length_penalty([""] * 2, ["a b c", "a " * 12], max_words=10, per_word=0.5) == [0.0, -1.0]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


def encode(tokenizer, prompt: str, answer: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    p = tokenizer(prompt)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + a + [tokenizer.pad_token_id] * 3])
    mask = torch.tensor([[1] * (len(p) + len(a)) + [0] * 3])
    return ids, mask, [len(p)]


def judge_of(tokenizer, *terms) -> Judge:
    return Judge(OmegaConf.create({"terms": list(terms)}), tokenizer)


def test_judge_weights_terms_and_reports_each(tokenizer):
    judge = judge_of(
        tokenizer,
        {"fn": "runner.rewards.tiny:ground_truth", "weight": 1.0},
        {"fn": "runner.rewards.common:length_penalty", "weight": 2.0, "name": "long", "kwargs": {"max_words": 3}},
    )
    ids, mask, lens = encode(tokenizer, "the boat", "the boat was lovely and great .")
    total, parts = judge(ids, mask, lens, [{}])
    # ground truth 2.0; 7 words past max_words 3 cost 4 x 0.01, weighted x2
    assert parts["ground_truth"].item() == pytest.approx(2.0)
    assert parts["long"].item() == pytest.approx(-0.04)
    assert total.item() == pytest.approx(2.0 - 0.08)


def bad_count(prompts, answers, rows):
    return [1.0] * (len(answers) + 1)


def not_finite(prompts, answers, rows):
    return [float("nan")] * len(answers)


def raises(prompts, answers, rows):
    raise ZeroDivisionError("boom")


@pytest.mark.parametrize(
    "fn, message",
    [
        ("bad_count", "returned 2 values for 1 answers"),
        ("not_finite", "returned nan for data.jsonl, line 3"),
        ("raises", r"raised ZeroDivisionError: boom \(a batch of 1 answers, the first for data.jsonl, line 3\)"),
    ],
)
def test_a_broken_reward_function_stops_the_run(tokenizer, fn, message):
    judge = judge_of(tokenizer, {"fn": f"tests.test_rewards:{fn}"})
    ids, mask, lens = encode(tokenizer, "the boat", "the boat was lovely")
    with pytest.raises(RewardError, match=message):
        judge(ids, mask, lens, [{"__row__": "data.jsonl, line 3"}])


def test_describe_names_the_judge():
    assert rewards.describe(OmegaConf.create({"terms": []})) is None
    one = OmegaConf.create({"terms": [{"fn": "runner.rewards.tiny:ground_truth"}]})
    assert rewards.describe(one) == "tiny:ground_truth"
    gsm8k = OmegaConf.load(CONF / "reward" / "gsm8k.yaml")
    assert rewards.describe(gsm8k) == "1 x math:answer_matches + 0.1 x format"
