"""The paper's recipe: docs/paper-recipe.md's tables against the configs, and where the
rollout offsets land (reasoning tokens only, or every token)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from mtrl.config import ConfigError, load_config
from mtrl.sampling import MultiTemperatureConfig, MultiTemperatureSampler

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "paper-recipe.md"
SCALED = ROOT / "experiments" / "paper" / "scaled-down.yaml"  # the recipe on a CPU (below)


def recipe_tables() -> dict[str, list[tuple[str, object]]]:
    """{config file: [(key path, value)]} from the doc's "Checked against" tables.

    Only rows whose "our key" cell is one backticked key are read; the value cell is YAML.
    """
    tables: dict[str, list[tuple[str, object]]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        found = re.match(r"Checked against: `([^`]+)`", line)
        if found:
            current = tables.setdefault(found.group(1), [])
            continue
        if not line.startswith("|"):
            if line.startswith("#"):
                current = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if current is None or len(cells) < 4:
            continue
        key, value = cells[2], cells[3]
        if re.fullmatch(r"`[\w.\[\]]+`", key) and re.fullmatch(r"`[^`]+`", value):
            current.append((key.strip("`"), yaml.safe_load(value.strip("`"))))
    return tables


def printed_config(path: str, *overrides: str) -> dict:
    """What `launch/train.py PATH [OVERRIDES] --print-config` prints, parsed (run in-process)."""
    import launch.train as train

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        train.main([str(ROOT / path), *overrides, "--print-config"])
    assert exit_.value.code == 0
    return yaml.safe_load(out.getvalue())


def test_doc_has_both_tables_with_their_core_rows():
    tables = recipe_tables()
    assert set(tables) == {
        "experiments/aime.yaml",
        "experiments/paper/reasoning-schedule-1.0-1.7-p0.4.yaml",
    }
    keys = {k for k, _ in tables["experiments/aime.yaml"]}
    for key in [
        "train.learning_rate",
        "train.max_steps",
        "train.generation_batch_size",
        "train.gradient_accumulation_steps",
        "train.warmup_steps",
        "train.weight_decay",
        "train.delta",
        "train.loss_type",
        "eval.num_samples",
    ]:
        assert key in keys, key


@pytest.mark.parametrize("path", sorted(recipe_tables()))
def test_print_config_matches_the_doc_table(path):
    printed = OmegaConf.create(printed_config(path))
    rows = recipe_tables()[path]
    assert len(rows) >= 10
    for key, want in rows:
        got = OmegaConf.select(printed, key, default="<missing>")
        if isinstance(got, ListConfig | DictConfig):
            got = OmegaConf.to_container(got)
        assert got == want, f"{path}: {key} is {got!r}, docs/paper-recipe.md says {want!r}"


def test_batch_arithmetic_gives_four_updates_of_1024_completions_per_generation():
    from mtrl.config import grpo_config

    cfg = load_config(ROOT / "experiments/aime.yaml")
    args = grpo_config(cfg)
    gpus = 8  # the file's batch keys are written for 8 GPUs; validation here sees one process
    per_update = args.per_device_train_batch_size * gpus * args.gradient_accumulation_steps
    assert per_update == 128 * 8
    assert args.generation_batch_size == 512 * 8
    steps_per_generation = args.generation_batch_size // (args.per_device_train_batch_size * gpus)
    assert steps_per_generation // args.gradient_accumulation_steps == 4
    # TRL computes old log-probs (so updates 2-4 are clipped) only in this misalignment
    assert args.gradient_accumulation_steps % (steps_per_generation * args.num_iterations) != 0
    assert args.lr_scheduler_type == "constant_with_warmup"
    assert args.beta == 0.0 and args.delta > 1 + args.epsilon_high


def gpu_table() -> list[dict[str, int]]:
    """The doc's "GPUs N" table: one dict of its integer columns per row."""
    lines = [line for line in DOC.read_text().splitlines() if line.startswith("| ")]
    start = next(i for i, line in enumerate(lines) if line.startswith("| GPUs N |"))
    header = [c.strip().split(" (")[0] for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not cells[0].isdigit():
            break
        rows.append(dict(zip(header, map(int, cells), strict=True)))
    return rows


def test_four_updates_per_generation_batch_on_every_gpu_count_of_the_doc():
    from mtrl.config import grpo_config

    rows = gpu_table()
    assert [row["GPUs N"] for row in rows] == [8, 4, 2, 1]
    aime = grpo_config(load_config(ROOT / "experiments/aime.yaml"))
    assert aime.gradient_accumulation_steps == rows[0]["gradient_accumulation_steps"]  # 8 GPUs
    for row in rows:
        gpus = row["GPUs N"]
        cfg = load_config(
            ROOT / "experiments/aime.yaml",
            [f"train.gradient_accumulation_steps={128 // gpus}"],  # the doc's rule
        )
        args = grpo_config(cfg)
        assert args.per_device_train_batch_size == row["per_device_train_batch_size"]
        assert args.gradient_accumulation_steps == row["gradient_accumulation_steps"]
        # TRL's GRPOConfig derives steps_per_generation for the processes it sees (one here,
        # which makes the 1-GPU row TRL's own number); the same rule for N processes:
        assert args.world_size == 1 and args.steps_per_generation == 4096 // 8
        per_step = args.per_device_train_batch_size * gpus
        steps_per_generation = args.generation_batch_size // per_step
        assert steps_per_generation == row["steps_per_generation"]
        # One optimizer update every gradient_accumulation_steps micro-steps; one generation
        # batch feeds steps_per_generation x num_iterations of them.
        micro_steps = steps_per_generation * args.num_iterations
        assert micro_steps % args.gradient_accumulation_steps == 0
        updates = micro_steps // args.gradient_accumulation_steps
        assert updates == row["updates per generation"] == 4
        completions = args.per_device_train_batch_size * gpus * args.gradient_accumulation_steps
        assert completions == 1024  # 128 prompts x 8 completions per update


def test_learning_rate_warms_up_linearly_then_stays_constant():
    from transformers import get_scheduler

    from mtrl.config import grpo_config

    args = grpo_config(load_config(ROOT / "experiments/aime.yaml"))
    assert args.max_steps == 1600 and args.learning_rate == 1.0e-6
    # What transformers' Trainer.create_scheduler builds from these arguments.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(args.max_steps),
        num_training_steps=args.max_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    lrs = []  # the rate of optimizer update k = 0 .. max_steps - 1
    for _ in range(args.max_steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    warmup = 40  # verl's 10 training steps x 4 updates
    want = [args.learning_rate * min(1.0, k / warmup) for k in range(args.max_steps)]
    assert lrs == pytest.approx(want, rel=1e-9, abs=1e-18)
    assert lrs[0] == 0.0 and lrs[20] == pytest.approx(0.5e-6) and lrs[39] < 1.0e-6
    assert set(lrs[warmup:]) == {args.learning_rate}


def test_aime_rewards_are_dapos_rule_reward_and_soft_overlong_punishment():
    from trl.trainer.utils import get_callable_name

    from mtrl.config import grpo_config
    from mtrl.rewards import build_reward_funcs

    cfg = load_config(ROOT / "experiments/aime.yaml")
    args = grpo_config(cfg)
    funcs, weights = build_reward_funcs(cfg.rewards, cfg.reward_options, args.max_completion_length)
    names = [get_callable_name(f) for f in funcs]  # how TRL names them in its metrics
    assert dict(zip(names, weights, strict=True)) == {
        "accuracy": 0.0,
        "format": 0.0,
        "dapo": 1.0,
        "soft_overlong": 1.0,
    }
    assert args.reward_weights == weights
    overlong = funcs[names.index("soft_overlong")]
    ids = [[0] * n for n in (1536, 1792, 2048)]  # the script: max_resp_len 2048, buffer 512
    got = overlong(prompts=[None] * 3, completions=[""] * 3, completion_ids=ids)
    assert got == [0.0, -0.5, -1.0]


@pytest.mark.parametrize(
    "path", sorted(p.name for p in (ROOT / "experiments/paper").glob("*.yaml") if p != SCALED)
)
def test_paper_configs_validate(path):
    cfg = load_config(ROOT / "experiments/paper" / path)
    assert cfg.model.name == "Qwen/Qwen2.5-Math-1.5B"


def test_paper_has_reasoning_only_offsets_and_schedule_configs():
    offsets = load_config(ROOT / "experiments/paper/rollout-offsets-reasoning.yaml").sampler
    assert offsets.mode == "multi" and offsets.rollout_offsets
    assert offsets.offsets_apply_to == "reasoning"
    everyone = load_config(ROOT / "experiments/paper/rollout-offsets-all.yaml").sampler
    assert everyone.offsets_apply_to == "all" and everyone.rollout_offsets
    sched = load_config(ROOT / "experiments/paper/reasoning-schedule-1.0-1.7-p0.4.yaml").sampler
    assert sched.high_temperature_schedule.kind == "step"
    assert sched.low_temperature_schedule.kind == "constant"  # knowledge tokens stay put
    sampler = MultiTemperatureSampler(OmegaConf.to_object(sched))
    for step, high in [(0, 1.0), (195, 1.0), (196, 1.1), (1395, 1.6), (1396, 1.7), (1599, 1.8)]:
        sampler.step = step
        values = sampler.scheduled_values()
        assert values["high_temperature"] == pytest.approx(high), step
        assert values["low_temperature"] == 1.0


def test_offsets_apply_to_is_validated_with_its_key(tmp_path):
    with pytest.raises(ValueError, match=r"^sampler\.offsets_apply_to: must be one of"):
        MultiTemperatureConfig(offsets_apply_to="knowledge").validate()
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "experiments/aime.yaml", ["sampler.offsets_apply_to=every"])
    assert str(err.value).startswith("sampler.offsets_apply_to:")
    assert "\n" not in str(err.value)


# Two peaked (knowledge) rows and two flat (reasoning) rows under a fixed threshold of 1.5.
ROWS = torch.tensor(
    [
        [6.0, 3.5, 2.0, 1.0, 0.5, 0.0],
        [0.0, 0.3, 5.0, 2.5, 1.5, 0.5],
        [0.3, 0.1, 0.0, -0.2, 0.4, 0.2],
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
    ]
).repeat(2, 1)


def _offset_sampler(apply_to: str, mode: str = "multi") -> MultiTemperatureSampler:
    cfg = MultiTemperatureConfig(
        mode=mode,
        threshold_mode="fixed",
        entropy_threshold=1.5,
        high_temperature=1.2,
        low_temperature=0.8,
        temperature=1.0,
        rollout_offsets=True,
        rollout_offset_step=0.1,
        offsets_apply_to=apply_to,
    )
    return MultiTemperatureSampler(cfg, generator=torch.Generator().manual_seed(0))


def test_offsets_move_only_reasoning_tokens_by_default():
    sampler = _offset_sampler("reasoning")
    offsets = sampler.offsets_tensor(num_generations=8, batch_size=8)
    assert offsets.tolist() == pytest.approx([0, 0, -0.1, 0.1, -0.2, 0.2, -0.3, 0.3])
    step = sampler(ROWS, temperature_offsets=offsets)
    assert step.is_reasoning.tolist() == [False, False, True, True] * 2
    want = torch.where(step.is_reasoning, 1.2 + offsets, torch.tensor(0.8))
    torch.testing.assert_close(step.temperatures, want)
    assert MultiTemperatureConfig().offsets_apply_to == "reasoning"


def test_offsets_move_every_token_when_all():
    sampler = _offset_sampler("all")
    offsets = sampler.offsets_tensor(num_generations=8, batch_size=8)
    step = sampler(ROWS, temperature_offsets=offsets)
    base = torch.where(step.is_reasoning, torch.tensor(1.2), torch.tensor(0.8))
    torch.testing.assert_close(step.temperatures, base + offsets)


@pytest.mark.parametrize("apply_to", ["reasoning", "all"])
def test_single_mode_offsets_move_the_one_temperature(apply_to):
    sampler = _offset_sampler(apply_to, mode="single")
    offsets = sampler.offsets_tensor(num_generations=8, batch_size=8)
    step = sampler(ROWS, temperature_offsets=offsets)
    torch.testing.assert_close(step.temperatures, 1.0 + offsets)


def test_reasoning_offsets_draw_knowledge_rows_at_the_knowledge_temperature():
    # The distribution, not just the recorded temperature: a knowledge row with a +2.0 offset
    # must still be drawn at 0.8 (its log-prob is that of softmax(logits / 0.8)).
    sampler = _offset_sampler("reasoning")
    logits = ROWS[:1].repeat(4000, 1)
    step = sampler(logits, temperature_offsets=torch.full((4000,), 2.0))
    want = torch.log_softmax(logits[0] / 0.8, -1)[step.tokens]
    torch.testing.assert_close(step.logprobs, want)
    freq = torch.bincount(step.tokens, minlength=6).float() / 4000
    assert abs(freq[0].item() - torch.softmax(logits[0] / 0.8, -1)[0].item()) < 0.03


# ---------------------------------------------------------------------------- scaled down

# What experiments/paper/scaled-down.yaml may change of aime.yaml (a key, or a section of
# keys): names, the model, the data, and sizes (batch, lengths, steps, evaluation). Any other
# key that differs is a feature of the recipe switched off or changed.
SCALED_MAY_CHANGE = (
    "name",
    "description",
    "model.name",
    "model.dtype",
    "data.source",
    "data.subset",
    "data.task",
    "data.task_options",
    "data.size",
    "data.seed",
    "data.few_shot",
    "reward_options.soft_overlong.buffer",
    "train.per_device_train_batch_size",
    "train.gradient_accumulation_steps",
    "train.generation_batch_size",
    "train.max_steps",
    "train.warmup_steps",
    "train.max_completion_length",
    "train.dataloader_pin_memory",
    "eval.every_n_steps",
    "eval.num_samples",
    "eval.max_new_tokens",
    "eval.max_problems",
    "eval.benchmarks",
    "tracking.experiment",
)


def flat(node: object, prefix: str = "") -> dict[str, object]:
    """Dotted key -> leaf value of a printed config (lists and empty mappings are leaves)."""
    if isinstance(node, dict) and node:
        out: dict[str, object] = {}
        for key, value in node.items():
            out.update(flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def changed_from_aime(path: str, *overrides: str) -> set[str]:
    """Keys whose printed value differs between aime.yaml and `path` (+ overrides)."""
    aime = flat(printed_config("experiments/aime.yaml"))
    other = flat(printed_config(path, *overrides))
    absent = object()
    return {k for k in aime.keys() | other.keys() if aime.get(k, absent) != other.get(k, absent)}


def not_a_size(keys: set[str]) -> set[str]:
    return {k for k in keys if not any(k == a or k.startswith(f"{a}.") for a in SCALED_MAY_CHANGE)}


def test_scaled_down_recipe_differs_from_aime_only_in_sizes_model_and_data():
    changed = changed_from_aime("experiments/paper/scaled-down.yaml")
    assert not_a_size(changed) == set()
    assert {"model.name", "data.source", "train.max_steps", "eval.benchmarks"} <= changed


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("dynamic_sampling.enabled=false", "dynamic_sampling.enabled"),
        ("rewards.soft_overlong=0.0", "rewards.soft_overlong"),
        ("train.delta=null", "train.delta"),
        ("train.weight_decay=0.0", "train.weight_decay"),
        ("train.mask_truncated_completions=true", "train.mask_truncated_completions"),
        ("sampler.offsets_apply_to=all", "sampler.offsets_apply_to"),
        ("eval.temperature=1.0", "eval.temperature"),
    ],
)
def test_a_feature_switched_off_in_the_scaled_down_recipe_is_caught(override, key):
    changed = changed_from_aime("experiments/paper/scaled-down.yaml", override)
    assert not_a_size(changed) == {key}


def test_scaled_down_recipe_keeps_the_shape_of_aime_batches_and_lengths():
    from mtrl.config import grpo_config

    aime_cfg, small_cfg = load_config(ROOT / "experiments/aime.yaml"), load_config(SCALED)
    aime, small = grpo_config(aime_cfg), grpo_config(small_cfg)
    # Micro-steps per generation batch: aime.yaml's on its 8 GPUs, scaled-down.yaml's on one.
    aime_micro = aime.generation_batch_size // (aime.per_device_train_batch_size * 8)
    assert small.world_size == 1
    for micro, args in [(aime_micro, aime), (small.steps_per_generation, small)]:
        assert micro * args.num_iterations // args.gradient_accumulation_steps == 4  # updates
        # TRL computes the old log-probs, so updates 2-4 are clipped against the sampler.
        assert args.gradient_accumulation_steps % (micro * args.num_iterations) != 0
    # Groups are whole within the generation batch (dynamic sampling replaces groups).
    assert small.generation_batch_size % small.num_generations == 0
    # The soft overlong buffer is the same quarter of the completion length.
    aime_buffer = aime_cfg.reward_options.soft_overlong.buffer / aime.max_completion_length
    small_buffer = small_cfg.reward_options.soft_overlong.buffer / small.max_completion_length
    assert small_buffer == aime_buffer == 0.25
    assert small_cfg.eval.max_new_tokens == small.max_completion_length
    assert 0 < small.warmup_steps < small.max_steps  # the warm-up, then the constant rate
    assert small.max_steps % 4 == 0  # whole generation batches


@pytest.mark.slow
def test_scaled_down_recipe_logs_every_feature_to_mlflow(tmp_path, monkeypatch):
    """Two updates of the scaled-down recipe with the real SmolLM2 into a file MLflow store:
    each feature's metrics are there, with values that follow from the config."""
    import mlflow

    from mtrl.run import train

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores else
    uri = f"file://{tmp_path / 'mlruns'}"
    cfg = load_config(
        SCALED,
        [
            f"train.output_dir={tmp_path / 'out'}",
            f"tracking.uri={uri}",
            # For time (about 40 s on two cores), none a feature: one generation batch of 2
            # prompts x 8 completions feeds both updates (micro-batches of 4, accumulation 2),
            # at most 2 rounds of dynamic sampling, evaluation and completion tables off.
            "train.max_steps=2",
            "train.generation_batch_size=16",
            "dynamic_sampling.max_rounds=2",
            "eval.every_n_steps=0",
            "tracking.log_completions=false",
        ],
    )
    train(cfg)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    (run,) = mlflow.search_runs(experiment_names=["scaled-down"], output_format="list")
    assert run.info.status == "FINISHED"

    def at(key: str) -> dict[int, float]:
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    params = run.data.params
    for key, value in [
        ("model.name", "smollm2-135m-instruct"),
        ("dynamic_sampling.enabled", "True"),
        ("dynamic_sampling.metric", "accuracy"),
        ("rewards.dapo", "1.0"),
        ("rewards.soft_overlong", "1.0"),
        ("train.delta", "10.0"),
        ("train.lr_scheduler_type", "constant_with_warmup"),
        ("train.weight_decay", "0.1"),
        ("train.mask_truncated_completions", "False"),
        ("sampler.offsets_apply_to", "reasoning"),
    ]:
        assert params[key] == value, key

    # One generation (step 1) feeds both updates; each update is logged.
    assert set(at("dynamic_sampling/rounds")) == {1}
    for key in ("loss", "grad_norm", "clip_ratio/low_mean", "clip_ratio/high_mean"):
        assert set(at(key)) == {1, 2}, key
    assert all(0.0 <= v <= 1.0 for v in at("clip_ratio/region_mean").values())
    # Warm-up over 4 updates: update k (from 0) at 1e-6 k / 4.
    assert at("learning_rate") == pytest.approx({1: 0.0, 2: 0.25e-6}, abs=1e-15)

    # Dynamic sampling: the batch's 2 groups are groups with variance or, at the cap, filled.
    rounds = at("dynamic_sampling/rounds")[1]
    kept, filled = at("dynamic_sampling/groups_kept")[1], at("dynamic_sampling/groups_filled")[1]
    assert 1 <= rounds <= 2 and kept + filled == 2
    dropped = at("dynamic_sampling/groups_dropped")[1]
    surplus = at("dynamic_sampling/groups_surplus")[1]
    assert kept + dropped + filled + surplus == 2 * rounds  # every generated group counted once
    assert at("dynamic_sampling/stopped_at_cap")[1] == float(filled > 0)
    assert kept >= 1  # SmolLM2 answers these about half the time

    # DAPO's reward is 2 accuracy - 1 on the same completions; it varies within kept groups.
    dapo, accuracy = at("rewards/dapo/mean")[1], at("rewards/accuracy/mean")[1]
    assert dapo == pytest.approx(2 * accuracy - 1, abs=1e-6)
    assert at("rewards/dapo/std")[1] > 0
    overlong = at("rewards/soft_overlong/mean")[1]
    assert -1.0 <= overlong <= 0.0 and at("rewards/soft_overlong/std")[1] >= 0.0
    assert at("reward")[1] == pytest.approx(dapo + overlong, abs=1e-5)  # weights 1, 1 (0, 0)

    # The multi-temperature sampler: each class at its temperature (no offsets in aime.yaml).
    assert at("sampler/reasoning/temperature_mean")[1] == pytest.approx(1.2, abs=1e-5)
    assert at("sampler/knowledge/temperature_mean")[1] == pytest.approx(0.8, abs=1e-5)
    assert 0.0 < at("sampler/reasoning_share")[1] < 1.0
