"""Wall time of a GRPO step: stock TRL GRPOTrainer against MultiTempGRPOTrainer, same config.

    python bench/grpo_step.py --out bench/results/grpo_step.md [--steps 4]

A Qwen2.5-1.5B-shaped model (28 layers, hidden 1536, 12/2 heads, MLP 8960; random bf16
weights, the tiny test tokenizer, so 1.3B parameters), 8 prompts x 8 generations, up to 256
new tokens. Stock: TRL's transformers-generate path at T = 1. Ours: the multi-temperature
sampler in the fast rollout engine. The first step (compilation, graph capture) is excluded.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import TrainerCallback
from trl import GRPOTrainer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mtrl.config import grpo_config, load_config  # noqa: E402
from mtrl.data import load_prompts  # noqa: E402
from mtrl.models import load_model_and_tokenizer  # noqa: E402
from mtrl.trainer import MultiTempGRPOTrainer  # noqa: E402

SHAPE = [
    "model.name=tiny",
    "model.dtype=bfloat16",
    "model.tiny.hidden_size=1536",
    "model.tiny.num_layers=28",
    "model.tiny.num_heads=12",
    "model.tiny.num_kv_heads=2",
    "model.tiny.intermediate_size=8960",
    "train.per_device_train_batch_size=64",
    "train.num_generations=8",
    "train.max_completion_length=256",
    "train.learning_rate=1e-6",
    "train.save_steps=1000",
    "tracking.log_completions=false",
]


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)


def completion_length(completions, **kwargs):
    return [len(c[-1]["content"] if not isinstance(c, str) else c) / 100 for c in completions]


def time_trainer(stock: bool, steps: int, work: Path) -> tuple[list[float], float]:
    cfg = load_config(
        ROOT / "experiments" / "smoke.yaml",
        [
            *SHAPE,
            f"train.max_steps={steps}",
            f"train.output_dir={work / ('stock' if stock else 'ours')}",
        ],
    )
    model, tokenizer, _ = load_model_and_tokenizer(cfg.model, cfg.pbs)
    args = grpo_config(cfg)
    args.reward_weights = None
    timer = StepTimer()
    common = dict(
        model=model,
        reward_funcs=[completion_length],
        args=args,
        train_dataset=load_prompts(cfg.data, tokenizer),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    if stock:
        trainer = GRPOTrainer(**common)
    else:
        trainer = MultiTempGRPOTrainer(
            **common,
            sampler_config=OmegaConf.to_object(cfg.sampler),
            rollout_config=OmegaConf.to_object(cfg.rollout),
        )
    trainer.train()
    tokens = trainer.state.num_input_tokens_seen
    del trainer, model
    torch.cuda.empty_cache()
    return timer.times, tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/grpo_step.md")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--work", default="/tmp/grpo_step")
    parser.add_argument("--commit")
    args = parser.parse_args()
    rows = {}
    for name, stock in (
        ("stock GRPOTrainer (transformers generate)", True),
        ("MultiTempGRPOTrainer (fast engine, multi-temperature)", False),
    ):
        times, _ = time_trainer(stock, args.steps, Path(args.work))
        rows[name] = times[1:]
        print(name, [f"{t:.2f}" for t in times], flush=True)
    commit = (
        args.commit
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    )
    base = sum(next(iter(rows.values()))) / len(next(iter(rows.values())))
    lines = [
        "# GRPO step wall time",
        "",
        f"- card: {torch.cuda.get_device_name()}; date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; commit: {commit}",
        f"- command: `python {' '.join(sys.argv)}`",
        "- setup: " + " ".join(f"`{o}`" for o in SHAPE) + " on experiments/smoke.yaml",
        f"- mean over steps 2..{args.steps} (step 1 holds compilation and graph capture)",
        "",
        "| trainer | s/step | speed-up |",
        "|---|---:|---:|",
    ]
    for name, times in rows.items():
        mean = sum(times) / len(times)
        lines.append(f"| {name} | {mean:.2f} | {base / mean:.2f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
