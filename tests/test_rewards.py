"""Rewards on real data: AIME 2025 gold answers, GSM8K, reasoning-gym; no mocks."""

from __future__ import annotations

import json
import pickle
import threading
import time

import pytest
from omegaconf import OmegaConf

from mtrl import scoring
from mtrl.config import ConfigError, DataConfig, load_config
from mtrl.data import load_prompts
from mtrl.rewards import (
    REWARDS,
    accuracy_reward,
    build_reward_funcs,
    dapo_reward,
    extract_answer,
    find_boxed,
    format_reward,
    is_plain_formula,
    last_boxed,
    pop_scoring_counts,
    reasoning_gym_reward,
    score_reasoning_gym,
)
from mtrl.scoring import ScoringConfig


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
    # A reward called from a thread: the pool's workers still run math-verify in their main
    # thread, where its SIGALRM limits work.
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
    assert set(REWARDS) == {"accuracy", "dapo", "format", "reasoning_gym", "soft_overlong"}
    for name, func in REWARDS.items():
        assert func.__name__ == name
        assert pickle.loads(pickle.dumps(func)) is func
    funcs, weights = build_reward_funcs(OmegaConf.create({"accuracy": 1.0, "format": 0.2}))
    assert [f.__name__ for f in funcs] == ["accuracy", "format"]
    assert weights == [1.0, 0.2]
    with pytest.raises(ValueError, match="rewards.acuracy: unknown reward"):
        build_reward_funcs({"acuracy": 1.0})


# ---------------------------------------------------------------------------- DAPO's rewards


def test_dapo_scores_plus_one_and_minus_one_on_aime(aime):
    golds = aime["answer"]
    pop_scoring_counts()
    assert dapo_reward(aime["prompt"], [solved(g) for g in golds], golds) == [1.0] * 30
    wrong = [solved(golds[(i + 1) % 30]) for i in range(30)]
    assert dapo_reward(aime["prompt"], wrong, golds) == [-1.0] * 30
    # Scored in the sandboxed pool, counted under its own name.
    assert pop_scoring_counts() == {"rewards/dapo/timeouts": 0.0, "rewards/dapo/crashes": 0.0}


def test_dapo_wrong_missing_or_unparseable_answers_score_minus_one():
    completions = [
        "so \\boxed{\\frac{1}{2}}",  # equal under math-verify
        "The answer is 0.5.",  # no box
        "\\boxed{0.5",  # unclosed
        "\\boxed{}",  # empty
        "\\boxed{\\frac{}{}}",  # unparseable
        "\\boxed{0.5} at first, then \\boxed{0.4}",  # the last box counts
        "",
        [{"role": "assistant", "content": "\\boxed{1/2}"}],  # chat completions too
    ]
    got = dapo_reward([None] * 8, completions, ["0.5"] * 8)
    assert got == [1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 1.0]
    # Rows without a gold answer do not apply, as for `accuracy`.
    assert dapo_reward([None] * 2, ["\\boxed{1}"] * 2, [None, " "]) == [None, None]


def overlong(funcs, lengths):
    """`funcs[0]` called as TRL calls a reward: keywords, token ids per completion."""
    ids = [[7] * n for n in lengths]
    return funcs[0](prompts=[None] * len(ids), completions=[""] * len(ids), completion_ids=ids)


def test_soft_overlong_punishment_values():
    options = {"soft_overlong": {"max_completion_length": 2048, "buffer": 512}}
    funcs, weights = build_reward_funcs({"soft_overlong": 1.0}, options)
    assert weights == [1.0]
    # 0 up to 2048 - 512 = 1536 tokens; the buffer starts at 1537; -1 at the limit and beyond.
    lengths = [0, 1, 1536, 1537, 1600, 1792, 2047, 2048, 2049, 4096]
    want = [0.0, 0.0, 0.0, -1 / 512, -64 / 512, -0.5, -511 / 512, -1.0, -1.0, -1.0]
    assert overlong(funcs, lengths) == pytest.approx(want, abs=1e-12)
    # TRL logs a reward by its name: rewards/soft_overlong/mean; it pickles (async rollouts).
    from trl.trainer.utils import get_callable_name

    assert get_callable_name(funcs[0]) == "soft_overlong"
    again = pickle.loads(pickle.dumps(funcs[0]))
    assert overlong([again], [1792]) == [-0.5]


def test_soft_overlong_null_max_is_the_generation_limit():
    options = {"soft_overlong": {"max_completion_length": None, "buffer": 4}}
    funcs, _ = build_reward_funcs({"soft_overlong": 1.0}, options, max_completion_length=16)
    assert overlong(funcs, [12, 13, 14, 16, 17]) == [0.0, -0.25, -0.5, -1.0, -1.0]


SO = "reward_options.soft_overlong"  # the section's key path, in every message below


@pytest.mark.parametrize(
    "options, max_len, message",
    [
        (None, 16, "SO.buffer: must be a whole number of tokens > 0, got None"),
        ({"soft_overlong": {"buffer": 0}}, 16, "SO.buffer: must be a whole number"),
        ({"soft_overlong": {"buffer": 16}}, 16, "SO.buffer: must be < train."),
        ({"soft_overlong": {"buffer": 4}}, None, "SO.max_completion_length: null means train."),
    ],
)
def test_soft_overlong_options_are_checked_when_built(options, max_len, message):
    with pytest.raises(ValueError) as err:
        build_reward_funcs({"soft_overlong": 1.0}, options, max_len)
    assert str(err.value).startswith(message.replace("SO", SO)), str(err.value)


def write_experiment(tmp_path, rewards: str):
    """An experiment on a tiny model with 64-token completions and the given `rewards:`."""
    path = tmp_path / "exp.yaml"
    path.write_text(
        "model: {name: tiny}\n"
        "data: {source: aime2025, split: test}\n"
        f"rewards: {rewards}\n"
        "train: {max_completion_length: 64, per_device_train_batch_size: 8}\n"
    )
    return path


@pytest.mark.parametrize(
    "override, message",
    [
        ("SO.buffer=0", "SO.buffer: must be > 0, got 0"),
        ("SO.buffer=-8", "SO.buffer: must be > 0, got -8"),
        ("SO.buffer=64", "SO.buffer: must be < train.max_completion_length (64), got 64"),
        ("SO.max_completion_length=0", "SO.max_completion_length: must be > 0, got 0"),
        (
            "SO.max_completion_length=16",
            "SO.buffer: must be < SO.max_completion_length (16), got 32",
        ),
        (
            "train.max_completion_length=null",
            "SO.max_completion_length: null means train.max_completion_length, which is null too",
        ),
        ("SO.bufer=8", "SO.bufer: unknown key (did you mean 'buffer'?) (in command line)"),
        ("reward_options.overlong.buffer=8", "reward_options.overlong: unknown key"),
    ],
)
def test_reward_options_config_errors_name_the_key(tmp_path, override, message):
    path = write_experiment(tmp_path, "{dapo: 1.0, soft_overlong: 1.0}")
    good = [f"{SO}.buffer=32"]
    assert load_config(path, good).reward_options.soft_overlong.buffer == 32
    with pytest.raises(ConfigError) as err:
        load_config(path, [*good, override.replace("SO", SO)])
    assert str(err.value).startswith(message.replace("SO", SO)), str(err.value)
    assert "\n" not in str(err.value)


def test_reward_options_are_read_only_for_named_rewards(tmp_path):
    # The default buffer (512) exceeds this run's 64-token completions: no error unless the
    # experiment uses soft_overlong.
    path = write_experiment(tmp_path, "{dapo: 1.0}")
    assert load_config(path).reward_options.soft_overlong.buffer == 512
    with pytest.raises(ConfigError) as err:
        load_config(path, ["rewards.soft_overlong=1.0"])
    assert str(err.value).startswith(f"{SO}.buffer: must be < train.max_completion_length (64)")


@pytest.mark.slow
def test_a_run_scores_token_lengths_and_logs_both_rewards(smoke_config):
    # The wiring end to end: config -> build_trainer -> TRL hands completion_ids over.
    from mtrl.run import build_trainer

    overrides = ["rewards.dapo=1.0", "rewards.soft_overlong=1.0", f"{SO}.buffer=4"]
    cfg = smoke_config(*overrides, "train.max_steps=1", "train.max_completion_length=12")
    trainer = build_trainer(cfg)
    trainer.train()
    logs = trainer.state.log_history[0]
    # base.yaml's 1 / 0 accuracy scores the same completions: dapo = 2 accuracy - 1.
    assert logs["rewards/dapo/mean"] == pytest.approx(2 * logs["rewards/accuracy/mean"] - 1)
    assert logs["rewards/dapo/timeouts"] == 0.0
    # Lengths 9..12 fall in the buffer, where the punishment is linear: (12 - 4 - L) / 4.
    assert logs["completions/min_length"] > 8, logs
    want = (12 - 4 - logs["completions/mean_length"]) / 4
    assert logs["rewards/soft_overlong/mean"] == pytest.approx(want)


# ---------------------------------------------------------------------------- untrusted output


def rg_rows(task: str, size: int = 2, seed: int = 5):
    ds = load_prompts(data_cfg(source="reasoning_gym", task=task, size=size, seed=seed))
    return list(ds["prompt"]), {k: list(ds[k]) for k in ds.column_names if k != "prompt"}


@pytest.fixture
def short_limits():
    """Pool limits short enough for a test; the default pool comes back afterwards."""
    scoring.configure(ScoringConfig(timeout_s=1.0, workers=2))
    pop_scoring_counts()
    yield
    scoring.configure(ScoringConfig())


EVAL_TASKS = ["string_insertion", "spiral_matrix", "binary_matrix", "n_queens"]
PARSE_EXPR_TASKS = ["countdown", "puzzle24", "polynomial_multiplication", "simple_integration"]


def payloads(target):
    return [
        f"__import__('os').system('touch {target}') or ['x']",
        f"open('{target}', 'w').write('x') and ['x']",
        # parse_expr keeps Python's builtins in scope: code without quotes or underscores
        "eval(" + "+".join(f"chr({ord(c)})" for c in f"open('{target}','w')") + ")",
    ]


@pytest.mark.parametrize("task", EVAL_TASKS + PARSE_EXPR_TASKS)
def test_code_in_an_answer_never_runs(task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the relative payload would land here, in the trainer's cwd
    prompts, columns = rg_rows(task, size=1)
    texts = payloads(tmp_path / "PWNED") + payloads("PWNED")
    completions = [f"\\boxed{{{text}}}" for text in texts]
    n = len(completions)
    rows = {k: v * n for k, v in columns.items()}
    assert reasoning_gym_reward(prompts * n, completions, **rows) == [0.0] * n
    assert list(tmp_path.iterdir()) == []
    # Belt and braces: the guards alone, in this process, without the sandbox around them.
    entry = {"question": None, "answer": columns["answer"][0], "metadata": {}}
    entry["metadata"] = json.loads(columns["metadata"][0])
    for text in texts:
        assert score_reasoning_gym(task, text, entry) == 0.0
    assert list(tmp_path.iterdir()) == []
    # The disarmed eval is scoped to the scorer: generators that eval their own expressions
    # (basic_arithmetic's) still work in this process afterwards.
    prompts, _ = rg_rows("basic_arithmetic", size=50)
    assert len(prompts) == 50


def test_list_answers_still_reach_the_eval_scorers():
    prompts, columns = rg_rows("string_insertion", size=2)
    as_list = [f"\\boxed{{{list(a)!r}}}" for a in columns["answer"]]
    exact = [f"\\boxed{{{a}}}" for a in columns["answer"]]
    assert reasoning_gym_reward(prompts, as_list, **columns) == [0.1, 0.1]  # the scorer's partial
    assert reasoning_gym_reward(prompts, exact, **columns) == [1.0, 1.0]


def test_formula_guard():
    for ok in ["3*4 + 5 - 2", "(9 - 1) / 2", "-12*x**3 + 5*x*y", "x**2/2 + C", "sin(2*x) + exp(x)"]:
        assert is_plain_formula(ok), ok
    for bad in ["__import__('os')", "eval(chr(49))", "x.func", "open(x)", "a; b", "[1]", "{}"]:
        assert not is_plain_formula(bad), bad


def test_countdown_answers_score_and_a_huge_power_times_out(short_limits):
    prompts, columns = rg_rows("countdown", size=2)
    right = [f"\\boxed{{{a}}}" for a in columns["answer"]]
    assert reasoning_gym_reward(prompts, right, **columns) == [1.0, 1.0]
    assert pop_scoring_counts() == {
        "rewards/reasoning_gym/timeouts": 0.0,
        "rewards/reasoning_gym/crashes": 0.0,
    }
    start = time.monotonic()
    rewards = reasoning_gym_reward(prompts, ["\\boxed{9**9**9**9}", right[1]], **columns)
    elapsed = time.monotonic() - start
    assert rewards == [0.0, 1.0]
    assert elapsed < 10, elapsed  # the 1 s limit, plus slack for a loaded 2-core machine
    assert pop_scoring_counts()["rewards/reasoning_gym/timeouts"] == 1.0
    assert pop_scoring_counts() == {}  # popped
    assert reasoning_gym_reward(prompts, right, **columns) == [1.0, 1.0]  # the new worker scores


def long_completion(answer: str) -> str:
    """About 70,000 characters: many boxes, unclosed ones and braces, the real answer last."""
    noise = "".join(f"\\boxed{{{i}}} {{ \\boxed{{ \\frac{{{i}}}{{" for i in range(2500))
    return noise[:69_000] + "}" * 40 + f" So \\boxed{{{answer}}}"


def test_a_70k_character_completion_is_extracted_fast_and_scored():
    text = long_completion("\\frac{1}{2}")
    assert 69_000 < len(text) < 71_000
    start = time.monotonic()
    assert last_boxed(text) == "\\frac{1}{2}"
    boxes = find_boxed(text)
    elapsed = time.monotonic() - start
    assert len(boxes) > 4000
    assert elapsed < 1.0, elapsed  # was 21.6 s: quadratic scanning
    assert accuracy_reward([None] * 2, [text, long_completion("3")], ["0.5"] * 2) == [1.0, 0.0]
    assert format_reward([None], [text]) == [0.0]  # thousands of boxes
    deep = "\\boxed{" * 20_000 + "7" + "}" * 20_000  # nested boxes: spans, not copies
    assert last_boxed(deep) == "7"
    start = time.monotonic()
    assert extract_answer("<answer>" * 20_000 + "\nx") == "x"  # no tag closes: the last line
    assert time.monotonic() - start < 1.0


def test_find_boxed_spans():
    text = "a \\boxed{1} \\boxed {\\frac{1}{2}} } \\boxed{\\boxed{3}} \\boxed{open"
    spans = find_boxed(text)
    contents = [None if end is None else text[start:end] for start, end in spans]
    assert contents == ["1", "\\frac{1}{2}", "\\boxed{3}", "3", None]
