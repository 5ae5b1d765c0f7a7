"""Dynamic sampling (DAPO's filter groups) on a real tiny model, with rewards whose group
variance each test decides: which groups are kept, how many rounds run, what the cap does."""

import pytest
import torch

from mtrl.config import ConfigError, DynamicSamplingConfig, load_config
from tests.conftest import SMOKE

N = 4  # smoke.yaml's num_generations
GROUPS = 4  # groups per generation batch below
BATCH = (
    f"train.generation_batch_size={N * GROUPS}",  # 4 micro-batches of 4 rows per generation
    "train.max_completion_length=4",
    "train.save_steps=100",
)
T, F = True, False


class ScriptedReward:
    """Call k (round k) gives group g of its batch the rewards 0, 1, 2, 3 when plan[k][g] is
    true (variance) and 1, 1, 1, 1 otherwise; plan repeats. Records each call's completions."""

    def __init__(self, plan: list[list[bool]]):
        self.__name__ = "scripted"
        self.plan = plan
        self.calls: list[list[list[int]]] = []  # completion ids of each call, by row

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        varies = self.plan[len(self.calls) % len(self.plan)]
        self.calls.append([list(ids) for ids in completion_ids])
        return [float(i % N) if varies[i // N] else 1.0 for i in range(len(completions))]

    def rows(self, call: int, groups: list[int]) -> list[tuple[int, ...]]:
        return [tuple(self.calls[call][g * N + i]) for g in groups for i in range(N)]


def row_index(completions, **kwargs):
    """A reward that differs within every group."""
    return [float(i) for i in range(len(completions))]


@pytest.fixture
def make(make_trainer):
    """`make(*overrides, reward_funcs=..., **dynamic_sampling)`: a tiny trainer with dynamic
    sampling on (the section's keys as keyword arguments)."""

    def build(*overrides, reward_funcs, **section):
        trainer = make_trainer(*BATCH, *overrides, reward_funcs=reward_funcs)
        config = DynamicSamplingConfig(enabled=True, **section)
        trainer.dynamic_sampling = trainer._checked_dynamic_sampling(config)
        return trainer

    return build


def generation_batch(trainer) -> dict:
    """The whole buffered generation batch after TRL's generation step (micro-batches joined)."""
    trainer.model.train()
    rows = [trainer.train_dataset[i] for i in range(GROUPS) for _ in range(N)]
    torch.manual_seed(0)
    trainer._prepare_inputs(rows)
    parts = trainer._buffered_inputs
    assert len(parts) == trainer.args.steps_per_generation == GROUPS
    width = max(p["completion_ids"].size(1) for p in parts)
    out = {}
    for key in ("completion_ids", "completion_mask", "advantages", "temperatures"):
        values = [p[key] for p in parts]
        if values[0].dim() == 2:
            values = [torch.nn.functional.pad(v, (0, width - v.size(1))) for v in values]
        out[key] = torch.cat(values)
    return out


def batch_rows(batch: dict) -> list[tuple[int, ...]]:
    mask = batch["completion_mask"].bool()
    return [tuple(ids[m].tolist()) for ids, m in zip(batch["completion_ids"], mask, strict=True)]


def last(trainer, key: str) -> float:
    return trainer._metrics["train"][f"dynamic_sampling/{key}"][-1]


def test_keeps_only_groups_with_variance_filling_the_batch_over_rounds(make):
    reward = ScriptedReward([[T, F, F, T], [F, F, F, F], [T, T, T, F]])
    trainer = make(reward_funcs=[reward], max_rounds=5)
    batch = generation_batch(trainer)
    assert len(reward.calls) == 3
    # Round 1: groups 0 and 3; round 2: none; round 3: the first two of its three.
    want = reward.rows(0, [0, 3]) + reward.rows(2, [0, 1])
    assert sorted(batch_rows(batch)) == sorted(want)
    assert (batch["advantages"] != 0).all()  # every kept group has variance
    assert last(trainer, "rounds") == 3
    assert last(trainer, "groups_kept") == GROUPS
    assert last(trainer, "groups_dropped") == 2 + 4 + 1
    assert last(trainer, "groups_surplus") == 1
    assert last(trainer, "groups_filled") == 0
    assert last(trainer, "stopped_at_cap") == 0.0


def test_stops_at_the_cap_and_fills_with_zero_variance_groups(make):
    reward = ScriptedReward([[F, T, F, F], [F, F, F, F], [T, T, T, T]])
    trainer = make(reward_funcs=[reward], max_rounds=2)
    batch = generation_batch(trainer)
    assert len(reward.calls) == 2  # the third round, which would fill it, never runs
    rows = batch_rows(batch)
    assert len(rows) == N * GROUPS  # TRL's batch keeps its size
    informative = reward.rows(0, [1])
    assert sorted(r for r in rows if r in informative) == sorted(informative)
    # The rest are zero-variance groups, zero advantage: first round 1's, then round 2's.
    assert int((batch["advantages"] != 0).sum()) == N
    filled = reward.rows(0, [0, 2, 3])
    assert sorted(r for r in rows if r not in informative) == sorted(filled)
    assert last(trainer, "rounds") == 2
    assert last(trainer, "groups_kept") == 1
    assert last(trainer, "groups_filled") == 3
    assert last(trainer, "groups_dropped") == 3 + 4 - 3
    assert last(trainer, "stopped_at_cap") == 1.0


@pytest.mark.parametrize(("metric", "rounds"), [("scripted", 2), ("reward", 1)])
def test_metric_is_the_total_reward_or_one_reward(make, metric, rounds):
    reward = ScriptedReward([[T, F, T, F], [F, T, F, T]])
    # row_index varies in every group, so the total reward does too.
    trainer = make(reward_funcs=[reward, row_index], metric=metric, max_rounds=3)
    generation_batch(trainer)
    assert last(trainer, "rounds") == rounds
    assert last(trainer, "groups_kept") == GROUPS


@pytest.mark.parametrize("engine", ["hf", "fast"])
def test_sampler_window_sees_every_generated_token_once(make, engine):
    reward = ScriptedReward([[T, F, F, F], [F, F, F, F], [T, T, T, F]])
    trainer = make(
        "sampler.mode=multi",
        "sampler.threshold_mode=window",
        "sampler.window_size=100000",
        f"rollout.engine={engine}",
        reward_funcs=[reward],
        max_rounds=3,
    )
    generation_batch(trainer)
    assert last(trainer, "rounds") == 3
    # Each round's old log-probs were scored (gradient_accumulation_steps 1 < 4 micro-batches
    # per generation) without adding to the window, and no round reset it.
    assert "old_per_token_logps" in trainer._buffered_inputs[0]
    generated = sum(len(ids) for call in reward.calls for ids in call)
    assert int(trainer.sampler.window.count) == generated


def test_training_with_dynamic_sampling_runs_and_logs(make):
    reward = ScriptedReward([[T, F, F, T], [F, T, T, F]])
    trainer = make("train.max_steps=5", reward_funcs=[reward], max_rounds=3)
    trainer.train()
    assert trainer.state.global_step == 5
    logged = [h for h in trainer.state.log_history if "dynamic_sampling/rounds" in h]
    # Two generation batches (steps 1 and 5), each filled by two rounds of two groups.
    assert [h["dynamic_sampling/rounds"] for h in logged] == [2.0, 2.0]
    assert [h["dynamic_sampling/groups_kept"] for h in logged] == [4.0, 4.0]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_config_section_is_checked_before_loading(tmp_path):
    def load(*overrides):
        return load_config(SMOKE, [f"train.output_dir={tmp_path}", *overrides])

    cfg = load("dynamic_sampling.enabled=true", "dynamic_sampling.metric=accuracy")
    assert cfg.dynamic_sampling.enabled and cfg.dynamic_sampling.max_rounds == 3
    with pytest.raises(ConfigError, match=r"^dynamic_sampling\.metric: 'acuracy' is not"):
        load("dynamic_sampling.enabled=true", "dynamic_sampling.metric=acuracy")
    with pytest.raises(ConfigError, match=r"^dynamic_sampling\.max_rounds: must be > 0, got 0"):
        load("dynamic_sampling.max_rounds=0")
    with pytest.raises(ConfigError, match=r"^dynamic_sampling\.max_round: unknown key"):
        load("dynamic_sampling.max_round=2")
    # A group may not span two processes (here: 6 rows per process, groups of 4).
    with pytest.raises(ValueError, match=r"^dynamic_sampling\.enabled: .* multiple of"):
        DynamicSamplingConfig(enabled=True).validate(["accuracy"], 6, 4)


WORKER = '''
import gc, json, os, sys, zlib
import torch
from omegaconf import OmegaConf
from mtrl.config import DynamicSamplingConfig, grpo_config, load_config
from mtrl.data import load_prompts
from mtrl.models import load_model_and_tokenizer
from mtrl.trainer import MultiTempGRPOTrainer

out, overrides = sys.argv[1], sys.argv[2:]
calls = []

def by_prompt(prompts, completions, **kwargs):
    """Variance in a group iff its prompt's CRC is even; checks each group is one prompt."""
    texts = [json.dumps(p) for p in prompts]
    groups = [texts[i : i + 4] for i in range(0, len(texts), 4)]
    assert all(len(set(g)) == 1 for g in groups), "a group spans several prompts"
    calls.append([g[0] for g in groups])
    return [float(i % 4) if zlib.crc32(t.encode()) % 2 == 0 else 1.0 for i, t in enumerate(texts)]

cfg = load_config(sys.argv[0].replace("worker.py", "smoke.yaml"), overrides)
model, tokenizer, _ = load_model_and_tokenizer(cfg.model, cfg.pbs)
args = grpo_config(cfg)
args.reward_weights = None
trainer = MultiTempGRPOTrainer(
    model=model, reward_funcs=[by_prompt], args=args,
    train_dataset=load_prompts(cfg.data, tokenizer), processing_class=tokenizer,
    sampler_config=OmegaConf.to_object(cfg.sampler),
    dynamic_sampling_config=DynamicSamplingConfig(enabled=True, metric="by_prompt", max_rounds=8),
)
trainer.model.train()
trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
parts = trainer._buffered_inputs
metrics = {k: v for k, v in trainer._metrics["train"].items() if k.startswith("dynamic")}
result = {
    "rows": sum(len(p["advantages"]) for p in parts),
    "zero_advantage_rows": sum(int((p["advantages"] == 0).sum()) for p in parts),
    "calls": calls,
    "metrics": metrics,
}
rank = trainer.accelerator.process_index
trainer.accelerator.end_training()
gc.collect()
# The group must be freed here, its gloo threads joined: one left for the interpreter's exit
# can abort it (see mtrl.config._import_deepspeed_comm_before_the_process_group).
result["threads_after_end"] = sorted(
    open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")
)
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(result, f)
'''


@pytest.mark.slow
def test_two_processes_fill_their_batches_in_the_same_rounds(tmp_path):
    """Two gloo processes: each fills its own groups, both run the same number of rounds (their
    collectives match), every group is one prompt and the processes draw different prompts."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from free_port import free_port

    (tmp_path / "worker.py").write_text(WORKER)
    shutil.copy(SMOKE, tmp_path / "smoke.yaml")
    shutil.copy(os.path.join(os.path.dirname(SMOKE), "base.yaml"), tmp_path / "base.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        str(tmp_path / "worker.py"), str(tmp_path),
        f"train.output_dir={tmp_path / 'out'}",
        "train.per_device_train_batch_size=4",
        "train.generation_batch_size=16",  # 2 micro-batches of 4 rows per process: 2 groups
        "train.max_completion_length=4",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    rounds = [r["metrics"]["dynamic_sampling/rounds"] for r in ranks]
    assert rounds[0] == rounds[1] and rounds[0][0] > 1  # some group of round 1 had no variance
    for r in ranks:
        assert not [t for t in r["threads_after_end"] if t.startswith("pt_gloo")], r
        assert r["rows"] == 8 and r["zero_advantage_rows"] == 0
        assert len(r["calls"]) == rounds[0][0]
        assert r["metrics"]["dynamic_sampling/stopped_at_cap"] == [0.0]
        assert r["metrics"]["dynamic_sampling/groups_kept"] == [4.0]  # summed over processes
    for call0, call1 in zip(ranks[0]["calls"], ranks[1]["calls"], strict=True):
        assert not set(call0) & set(call1)  # each process its own slice of the global batch
