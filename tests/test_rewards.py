"""Rewards on real data: AIME 2025 gold answers, GSM8K, reasoning-gym; no mocks."""

from __future__ import annotations

import pickle
import threading

import pytest
from omegaconf import OmegaConf

from mtrl.config import DataConfig
from mtrl.data import load_prompts
from mtrl.rewards import (
    REWARDS,
    accuracy_reward,
    build_reward_funcs,
    extract_answer,
    format_reward,
    last_boxed,
    reasoning_gym_reward,
)


def data_cfg(**kwargs):
    return OmegaConf.structured(DataConfig(**kwargs))


@pytest.fixture(scope="module")
def aime():
    return load_prompts(data_cfg(source="aime2025"))


def solved(answer: str) -> str:
    return f"Let me think.\nSome algebra $x^2 = 4$.\nThe final answer is $\\boxed{{{answer}}}$."


def test_aime_all_gold_answers_score_one_and_wrong_ones_zero(aime):
    golds = aime["answer"]
    assert len(golds) == 30
    right = accuracy_reward(aime["prompt"], [solved(g) for g in golds], golds)
    assert right == [1.0] * 30
    # A wrong answer: the next problem's gold (all 30 AIME answers differ).
    assert len(set(golds)) == 30
    wrong = [solved(golds[(i + 1) % 30]) for i in range(30)]
    assert accuracy_reward(aime["prompt"], wrong, golds) == [0.0] * 30


def test_aime_uses_last_boxed_only(aime):
    gold = aime["answer"][0]  # 70
    assert gold == "70"
    earlier_right = f"First guess \\boxed{{{gold}}}, but actually \\boxed{{71}}."
    earlier_wrong = f"First guess \\boxed{{71}}, but actually \\boxed{{{gold}}}."
    assert accuracy_reward([None] * 2, [earlier_right, earlier_wrong], [gold] * 2) == [0.0, 1.0]


@pytest.mark.parametrize(
    "gold, predicted",
    [
        ("336^\\circ", "336"),
        ("336^\\circ", "336^\\circ"),
        ("336^\\circ", "336^{\\circ}"),
        ("\\frac{1}{2}", "0.5"),
        ("\\frac{1}{2}", "1/2"),
        ("\\frac{1}{2}", "\\dfrac{1}{2}"),
        ("142.0", "142"),
        ("142", "142.0"),
        ("70", "70"),
        ("70", "\\text{70}"),
        ("1000", "1,000"),
        ("\\sqrt{2}", "2^{1/2}"),
        ("\\boxed{5}", "5"),
        ("$5$", "5"),
    ],
)
def test_equivalent_forms_match(gold, predicted):
    assert accuracy_reward([None], [f"so \\boxed{{{predicted}}}"], [gold]) == [1.0]


@pytest.mark.parametrize(
    "gold, completion",
    [
        ("336^\\circ", "\\boxed{337}"),
        ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}"),
        ("70", "\\boxed{7}"),
        ("70", "The answer is 70."),  # no \boxed{}
        ("70", "\\boxed{70"),  # unclosed
        ("70", "\\boxed{}"),  # empty
        ("70", "\\boxed{\\frac{}{}}"),  # unparseable
        ("70", ""),
    ],
)
def test_wrong_missing_or_unparseable_answers_score_zero(gold, completion):
    assert accuracy_reward([None], [completion], [gold]) == [0.0]


def test_gsm8k_gold_answers_match_real_rows():
    ds = load_prompts(data_cfg(source="gsm8k", max_samples=50))
    golds = ds["answer"]
    assert accuracy_reward(ds["prompt"], [solved(g) for g in golds], golds) == [1.0] * 50
    wrong = [solved(str(int(float(g)) + 1)) for g in golds]
    assert accuracy_reward(ds["prompt"], wrong, golds) == [0.0] * 50


def test_conversational_completions():
    completions = [
        [{"role": "assistant", "content": "Thinking... \\boxed{\\frac{1}{2}}"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "ok \\boxed{0.5}"}]}],
        [{"role": "assistant", "content": "\\boxed{3}"}],
    ]
    prompts = [[{"role": "user", "content": "q"}]] * 3
    assert accuracy_reward(prompts, completions, ["0.5"] * 3) == [1.0, 1.0, 0.0]
    assert format_reward(prompts, completions) == [1.0, 1.0, 1.0]


def test_accuracy_outside_the_main_thread():
    # math-verify's SIGALRM timeouts cannot run in a worker thread; the reward still works.
    result = []
    worker = threading.Thread(
        target=lambda: result.append(
            accuracy_reward([None] * 2, ["\\boxed{336}", "\\boxed{335}"], ["336^\\circ"] * 2)
        )
    )
    worker.start()
    worker.join()
    assert result == [[1.0, 0.0]]


def test_format_reward():
    completions = [
        "Reasoning...\nFinal answer: $\\boxed{42}$.",  # one box at the end
        "\\boxed{1} then \\boxed{2}",  # two boxes
        "no box at all",
        "\\boxed{}",  # empty
        "\\boxed{42",  # unclosed
        "\\boxed{42}" + " and then I kept talking" * 10,  # box not at the end
        "\\boxed{\\frac{1}{2}}",  # nested braces
    ]
    assert format_reward([None] * 7, completions) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_extraction_helpers():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("nothing") is None
    assert extract_answer("x \\boxed{\\text{yes}}") == "yes"
    assert extract_answer("x <answer> 12 </answer> y") == "12"
    assert extract_answer("work\n\n  17  \n") == "17"
    assert extract_answer("") is None


def test_reasoning_gym_scorer_rewards_the_correct_answer():
    ds = load_prompts(data_cfg(source="reasoning_gym", task="basic_arithmetic", size=8, seed=3))
    columns = {k: ds[k] for k in ds.column_names if k != "prompt"}
    right = [[{"role": "assistant", "content": f"... \\boxed{{{a}}}"}] for a in ds["answer"]]
    assert reasoning_gym_reward(ds["prompt"], right, **columns) == [1.0] * 8
    tagged = [f"<answer>{a}</answer>" for a in ds["answer"]]
    assert reasoning_gym_reward(ds["prompt"], tagged, **columns) == [1.0] * 8
    last_line = [f"I computed it.\n{a}" for a in ds["answer"]]
    assert reasoning_gym_reward(ds["prompt"], last_line, **columns) == [1.0] * 8
    wrong = [f"\\boxed{{{int(a) + 1}}}" for a in ds["answer"]]
    assert all(r < 1.0 for r in reasoning_gym_reward(ds["prompt"], wrong, **columns))
    assert reasoning_gym_reward(ds["prompt"], ["no idea"] * 8, **columns) == [0.0] * 8


def test_reasoning_gym_reward_does_not_apply_to_other_rows():
    assert reasoning_gym_reward([None] * 2, ["\\boxed{1}"] * 2, answer=["1", "2"]) == [None, None]


def test_registry_names_and_build():
    assert set(REWARDS) == {"accuracy", "format", "reasoning_gym"}
    for name, func in REWARDS.items():
        assert func.__name__ == name
        assert pickle.loads(pickle.dumps(func)) is func
    funcs, weights = build_reward_funcs(OmegaConf.create({"accuracy": 1.0, "format": 0.2}))
    assert [f.__name__ for f in funcs] == ["accuracy", "format"]
    assert weights == [1.0, 0.2]
    with pytest.raises(ValueError, match="rewards.acuracy: unknown reward"):
        build_reward_funcs({"acuracy": 1.0})
