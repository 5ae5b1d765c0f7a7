"""One GRPO step of MultiTempGRPOTrainer split by phase, dense SDPA against PBS-Attn.

    python bench/grpo_step.py --prompt-len 32768 --attn both --config experiments/longctx.yaml
    python bench/grpo_step.py --config experiments/aime.yaml --gpus 8 --out bench/results/recipe.md
    python bench/grpo_step.py --tiny --prompt-len 300 --attn both pbs.min_seq_len=0   # CPU plumbing

What runs: the trainer's own step. A real `MultiTempGRPOTrainer` trains on a config (default
experiments/smoke.yaml with a 64-completion batch, 256 new tokens; `--config` any experiment,
its batch, lengths and features: sampler, dynamic sampling, importance sampling, rewards,
gradient checkpointing, loss options); trailing `section.key=value` arguments override it.
The phases are timed from the outside, without re-implementing any of the step: a subclass
whose overrides only call `super()` between two timer marks (`_prepare_inputs`,
`_generate_single_turn`, `_get_per_token_logps_and_entropies` without grad, `training_step`),
a wrapper on the rollout engine's `_prefill`, and trainer callbacks around the optimizer step.
A timer mark synchronises CUDA and reads the host clock; each phase counts its own time, not
that of the phases inside it, so the phases add up to the step:

    rollout prefill     the engine's prompt forward (PBS-Attn serves it when configured)
    rollout decode      the rest of the rollout: the decoding steps, sampling, host copies
    log-prob forwards   forwards without grad: old/importance-sampling and reference log-probs
    rewards + batch     the rest of TRL's generation batch: decoding text, rewards, advantages,
                        dynamic-sampling bookkeeping, shuffling and splitting into micro-batches
    forward+backward    the loss forward (with grad, PBS too) and the backward of each micro-batch
    optimizer step      `optimizer.step()`
    other               the rest of the update: gradient clipping, scheduler, zero_grad

On CUDA each phase also reports its peak allocated memory (everything alive, the kept KV
cache and optimizer states included). A "step" here is one generation batch: its rollout and
the optimizer updates it feeds (aime.yaml: 4); the first `--warmup` of them (compilation,
CUDA-graph capture) are left out and the rest averaged.

Model: `bench/shapes.py`'s Qwen2.5-1.5B shape (vocabulary 151,936) with random weights in
`model.dtype`, built from its config (the config's `model.name` is not loaded), in
`model.attn_implementation` or per `--attn` (`pbs` registers PBS-Attn with the config's `pbs`
section). Prompts: `--prompt-len` random token ids per prompt, one fixed draw per dataset row,
so a group's completions share their prompt (random ids do not survive a round trip through
text, so the subclass hands them to TRL in place of its tokenization). The tokenizer is the
project's small test tokenizer: ids beyond its vocabulary decode to nothing, so the config's
rewards run on empty text. A random model almost never draws EOS (1 id in 151,936): every
completion runs to `max_completion_length`, the most a step can cost. For PBS rows, the
density (kept / causal blocks over all layers) of one prompt's forward is reported: random
weights give flat attention and therefore dense plans, unlike trained models.

`--config` also prints what the config's full run costs: its `train.max_steps` (TRL counts
optimizer updates) at the measured time per update, on `--gpus` GPUs. The measured process is
one of those GPUs: a `train.generation_batch_size` (global in TRL) is divided by `--gpus`, the
per-device keys are kept (aime.yaml's are written for 8 GPUs). Dynamic sampling runs one round
(random weights make every group's rewards equal, which would run every round to the cap);
each further round costs about one more rollout, log-prob and rewards phase, as printed. Not
included: evaluation, checkpoints, gradient communication between GPUs.

The stock-GRPOTrainer comparison of earlier tables in bench/results/grpo_step.md was made by
this script at commit e147d10.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import statistics
import sys
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from report import git_commit, header  # noqa: E402  (bench/ is the script folder)
from shapes import QWEN25_15B, TINY  # noqa: E402

from mtrl.trainer import MultiTempGRPOTrainer  # noqa: E402

# Without --config: the smoke experiment at the batch of the earlier tables.
DEFAULT_CONFIG = ROOT / "experiments" / "smoke.yaml"
DEFAULT_OVERRIDES = [
    "train.per_device_train_batch_size=64",
    "train.num_generations=8",
    "train.max_completion_length=256",
    "train.learning_rate=1e-6",
]
# Always: the fast engine (its prefill is a phase; on CUDA `auto` picks it anyway), no
# checkpoints, no completion tables.
BENCH_OVERRIDES = [
    "rollout.engine=fast",
    "train.save_strategy='no'",
    "tracking.log_completions=false",
]
# PBS's Triton kernels need a head dimension of at least 16 (TINY's is 8).
TINY_SHAPE = {**TINY, "hidden_size": 64}
ATTN = {"dense": "sdpa", "pbs": "pbs"}
# (key, column title) in step order; the keys are the timer's phase names.
PHASES = [
    ("prefill", "rollout prefill"),
    ("decode", "rollout decode"),
    ("logprobs", "log-prob forwards"),
    ("batch", "rewards + batch"),
    ("train", "forward+backward"),
    ("optimizer", "optimizer step"),
    ("other", "other"),
]
GIB = 1024**3


# ---------------------------------------------------------------------------------------------
# Timing


@dataclasses.dataclass
class _Open:
    name: str
    start: float
    children: float = 0.0  # seconds spent in phases opened inside this one
    peak: int = 0  # bytes, during this phase's own time


class Phases:
    """Seconds and peak memory per named phase; phases nest, each counts only its own time.

    `with phases("name"):` or `begin`/`end` pairs (callbacks). On CUDA every mark
    synchronises the device, and the peak-memory counter is reset at every mark so that a
    phase's peak covers its own time only. A phase opened inside one of the same name (a
    re-entrant call) is not counted twice.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.peaks: dict[str, int] = defaultdict(int)
        self._stack: list[_Open] = []
        self._depth: dict[str, int] = defaultdict(int)

    def _mark(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _peak(self) -> int:
        if not self.cuda:
            return 0
        peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return peak

    def begin(self, name: str) -> None:
        self._depth[name] += 1
        if self._depth[name] > 1:
            return
        now = self._mark()
        if self._stack:
            self._stack[-1].peak = max(self._stack[-1].peak, self._peak())
        else:
            self._peak()
        self._stack.append(_Open(name, now))

    def end(self, name: str) -> None:
        self._depth[name] -= 1
        if self._depth[name] > 0:
            return
        now = self._mark()
        top = self._stack.pop()
        if top.name != name:
            raise RuntimeError(f"phase '{name}' ended inside '{top.name}'")
        elapsed = now - top.start
        self.seconds[name] += elapsed - top.children
        self.peaks[name] = max(self.peaks[name], top.peak, self._peak())
        if self._stack:
            self._stack[-1].children += elapsed

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.begin(name)
        try:
            yield
        finally:
            self.end(name)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            with self(name):
                return fn(*args, **kwargs)

        return timed

    def take(self) -> dict[str, tuple[float, int]]:
        """{phase: (seconds, peak bytes)} since the last take; starts afresh."""
        out = {name: (self.seconds[name], self.peaks[name]) for name in self.seconds}
        self.seconds.clear()
        self.peaks.clear()
        return out


class PhaseTimedTrainer(MultiTempGRPOTrainer):
    """MultiTempGRPOTrainer with timer marks around its phases and random-id prompts.

    Every override calls `super()` unchanged between two marks, except `_tokenize_prompts`,
    which returns `prompt_len` random ids per prompt (drawn from the prompt text's hash, so
    the copies of one prompt in a group are equal) instead of tokenizing the text.
    """

    def __init__(self, *args, phases: Phases, prompt_len: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.phases = phases
        self.prompt_len = prompt_len
        vocab = self.model.config.get_text_config().vocab_size
        allowed = torch.ones(vocab, dtype=torch.bool)
        allowed[[*self._tokenizer.all_special_ids, *self.eos_token_ids]] = False
        self._prompt_pool = allowed.nonzero().squeeze(1)

    def _tokenize_prompts(self, prompts: list):
        ids = []
        for prompt in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(str(prompt).encode()))
            draw = torch.randint(len(self._prompt_pool), (self.prompt_len,), generator=g)
            ids.append(self._prompt_pool[draw].tolist())
        return ids, None, {}

    def training_step(self, *args, **kwargs):
        with self.phases("train"):
            return super().training_step(*args, **kwargs)

    def _prepare_inputs(self, *args, **kwargs):
        with self.phases("batch"):
            return super()._prepare_inputs(*args, **kwargs)

    def _generate_single_turn(self, *args, **kwargs):
        with self.phases("decode"):
            return super()._generate_single_turn(*args, **kwargs)

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        if torch.is_grad_enabled():  # the loss forward: part of forward+backward
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)
        with self.phases("logprobs"):
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)

    def _rollout_engine(self, model):
        engine = super()._rollout_engine(model)
        if engine is not None and "_prefill" not in vars(engine):
            engine._prefill = self.phases.wrap("prefill", engine._prefill)
            self.engine = engine  # released after the run: its cache and graphs are large
        return engine


class StepRecorder(TrainerCallback):
    """Opens the `other` phase around each optimizer update and `optimizer` around its step;
    after every `updates` updates (one generation batch) stores the phases taken."""

    def __init__(self, phases: Phases, updates: int):
        self.phases, self.updates = phases, updates
        self.records: list[dict[str, tuple[float, int]]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.phases.begin("other")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.phases.begin("optimizer")

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.phases.end("optimizer")

    def on_step_end(self, args, state, control, **kwargs):
        self.phases.end("other")
        if state.global_step % self.updates == 0:
            self.records.append(self.phases.take())


# ---------------------------------------------------------------------------------------------
# One configuration


@dataclasses.dataclass
class Result:
    label: str
    seconds: dict[str, float]  # phase -> mean seconds per step (generation batch)
    peaks: dict[str, int]  # phase -> peak bytes over the measured steps
    density: float | None  # PBS kept / causal blocks of one prompt's forward
    completion_len: float | None  # mean completion tokens
    params: int
    dtype: str

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def updates_per_generation(grpo: Any) -> int:
    """Optimizer updates one generation batch feeds (TRL: steps_per_generation x num_iterations
    micro-batches, gradient_accumulation_steps per update); at least 1."""
    return max(
        1, grpo.steps_per_generation * grpo.num_iterations // grpo.gradient_accumulation_steps
    )


def build_model(shape: dict, cfg: Any, device: torch.device, positions: int):
    """The random-weight policy of `shape` in `cfg.model`'s dtype and attention, on `device`,
    for sequences of up to `positions` tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mtrl.models import register_pbs, resolve_dtype

    if cfg.model.attn_implementation == "pbs":
        register_pbs(cfg.pbs)
    config = AutoConfig.for_model("qwen2", **shape)
    # RoPE needs no table; a prompt + completion beyond the shape's 32K just moves the limit.
    config.max_position_embeddings = max(config.max_position_embeddings, positions)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(
            config,
            dtype=resolve_dtype(cfg.model.dtype),
            attn_implementation=cfg.model.attn_implementation,
        )


def pbs_density(model, prompt_len: int) -> float:
    """Kept / causal blocks over every PBS call of one no-grad forward of random ids."""
    import pbs.hf

    kept = causal = 0
    original = pbs.hf.pbs_attention

    def counted(q, k, v, config):
        nonlocal kept, causal
        out, stats = original(q, k, v, config=config, return_stats=True)
        kept += stats.get("kept_blocks", 0)
        causal += stats.get("causal_blocks", 0)
        return out

    ids = torch.randint(3, model.config.vocab_size, (1, prompt_len), device=model.device)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        pbs.hf.pbs_attention = counted
        stack.callback(setattr, pbs.hf, "pbs_attention", original)
        model(input_ids=ids, logits_to_keep=1)
    return kept / causal if causal else 1.0


def run(cfg: Any, label: str, shape: dict, args: argparse.Namespace, work: Path) -> Result:
    """Train `args.warmup + args.steps` generation batches of `cfg`; the measured phases."""
    from datasets import Dataset
    from omegaconf import OmegaConf

    from mtrl.config import grpo_config
    from mtrl.models import build_tiny_tokenizer
    from mtrl.rewards import build_reward_funcs

    grpo = grpo_config(cfg)
    grpo.output_dir = str(work / label)
    updates = updates_per_generation(grpo)
    grpo.max_steps = updates * (args.warmup + args.steps)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(shape, cfg, device, args.prompt_len + grpo.max_completion_length)
    tokenizer = build_tiny_tokenizer()
    reward_funcs, _ = build_reward_funcs(
        cfg.rewards, cfg.reward_options, grpo.max_completion_length
    )
    dynamic = OmegaConf.to_object(cfg.dynamic_sampling)
    dynamic.max_rounds = 1  # see the module doc
    rows = grpo.generation_batch_size // grpo.num_generations * (args.warmup + args.steps + 2)
    dataset = Dataset.from_dict(
        {
            "prompt": [f"prompt {i}" for i in range(rows)],
            "problem": [f"prompt {i}" for i in range(rows)],
            "answer": ["0"] * rows,
        }
    )
    phases = Phases(device)
    recorder = StepRecorder(phases, updates)
    trainer = PhaseTimedTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=grpo,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[recorder],
        sampler_config=OmegaConf.to_object(cfg.sampler),
        rollout_config=OmegaConf.to_object(cfg.rollout),
        dynamic_sampling_config=dynamic,
        phases=phases,
        prompt_len=args.prompt_len,
    )
    trainer.train()
    measured = recorder.records[args.warmup :]
    if not measured:
        raise RuntimeError(f"{label}: no measured step ({len(recorder.records)} recorded)")
    missing = [title for key, title in PHASES if not all(key in r for r in measured)]
    if missing:
        raise RuntimeError(f"{label}: phases never timed: {', '.join(missing)}")
    seconds = {k: statistics.mean(r[k][0] for r in measured) for k, _ in PHASES}
    peaks = {k: max(r[k][1] for r in measured) for k, _ in PHASES}
    lengths = [
        h["completions/mean_length"]
        for h in trainer.state.log_history
        if "completions/mean_length" in h
    ]
    density = None
    if cfg.model.attn_implementation == "pbs":
        density = pbs_density(trainer.model, args.prompt_len)
    params = sum(p.numel() for p in trainer.model.parameters())
    dtype = str(trainer.model.dtype).removeprefix("torch.")
    if getattr(trainer, "engine", None) is not None:
        trainer.engine.release()
    del trainer, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Result(
        label=label,
        seconds=seconds,
        peaks=peaks,
        density=density,
        completion_len=statistics.mean(lengths[args.warmup :] or lengths) if lengths else None,
        params=params,
        dtype=dtype,
    )


# ---------------------------------------------------------------------------------------------
# Report


def cost_lines(cfg: Any, grpo: Any, results: list[Result], gpus: int, card_bytes: int) -> list[str]:
    """The full run of `cfg` (train.max_steps updates) at the measured time per update."""
    max_steps = cfg.train.get("max_steps")
    if not max_steps or max_steps < 0:
        return ["", "No cost estimate: the config sets no train.max_steps."]
    updates = updates_per_generation(grpo)
    dynamic = cfg.dynamic_sampling.enabled
    lines = [
        "",
        "## What the full run costs",
        "",
        f"train.max_steps = {max_steps} optimizer updates, {updates} per generation batch; each "
        f"of {gpus} GPU(s) runs the measured step (extra dynamic-sampling rounds, evaluation, "
        "checkpoints and gradient communication not included).",
        "",
        "| attention | s per update | hours | GPUs x hours | GPU-hours | + GPU-hours per extra "
        "sampling round | peak memory |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in results:
        per_update = r.total / updates
        hours = max_steps * per_update / 3600
        rounds = sum(r.seconds[k] for k in ("prefill", "decode", "logprobs", "batch"))
        extra = f"{max_steps / updates * rounds / 3600 * gpus:.0f}" if dynamic else "-"
        peak = max(r.peaks.values())
        memory = f"{peak / GIB:.1f} of {card_bytes / GIB:.0f} GiB" if card_bytes else "-"
        lines.append(
            f"| {r.label} | {per_update:.2f} | {hours:.1f} | {gpus} x {hours:.1f} | "
            f"{gpus * hours:.0f} | {extra} | {memory} |"
        )
    return lines


def write_report(args: argparse.Namespace, cfg: Any, results: list[Result], shape_name: str) -> str:
    from mtrl.config import grpo_config

    grpo = grpo_config(cfg)
    cuda = torch.cuda.is_available()
    card = torch.cuda.get_device_name() if cuda else "cpu"
    card_bytes = torch.cuda.get_device_properties(0).total_memory if cuda else 0
    commit = git_commit(args.commit, watch=("bench", "mtrl", "pbs"))
    rows = grpo.generation_batch_size
    updates = updates_per_generation(grpo)
    first = results[0]
    lines = header("GRPO step by phase", card, commit) + [
        f"- config: {args.config or DEFAULT_CONFIG.relative_to(ROOT)} with "
        + " ".join(f"`{o}`" for o in args.applied),
        f"- model: {shape_name} with random weights, {first.params:,} parameters, "
        f"{first.dtype}, gradient checkpointing {'on' if grpo.gradient_checkpointing else 'off'}",
        f"- step = one generation batch: a rollout of {rows} completions ({rows // grpo.num_generations} "
        f"prompts x {grpo.num_generations}) of prompts of {args.prompt_len} random tokens, up to "
        f"{grpo.max_completion_length} new tokens"
        + (f" (mean {first.completion_len:.0f})" if first.completion_len else "")
        + f", then {updates} optimizer update(s) of {grpo.gradient_accumulation_steps} micro-batch(es) "
        f"of {grpo.per_device_train_batch_size} rows; mean over {args.steps} step(s) after "
        f"{args.warmup} warm-up",
        "",
        "Seconds per step (each phase its own time; they add up to the step):",
        "",
        "| attention | " + " | ".join(t for _, t in PHASES) + " | step | speed-up | PBS density |",
        "|---|" + "---:|" * (len(PHASES) + 3),
    ]
    for r in results:
        cells = [f"{r.seconds[k]:.3f}" for k, _ in PHASES]
        density = f"{r.density:.2f}" if r.density is not None else "-"
        lines.append(
            f"| {r.label} | " + " | ".join(cells)
            + f" | {r.total:.3f} | {first.total / r.total:.2f}x | {density} |"
        )  # fmt: skip
    lines += [
        "",
        "Peak allocated memory per phase, GiB" + ("" if cuda else " (CUDA only)") + ":",
        "",
        "| attention | " + " | ".join(t for _, t in PHASES) + " |",
        "|---|" + "---:|" * len(PHASES),
    ]
    for r in results:
        cells = [f"{r.peaks[k] / GIB:.1f}" if cuda else "-" for k, _ in PHASES]
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    if args.config:
        lines += cost_lines(cfg, grpo, results, args.gpus, card_bytes)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", help="experiment file (default: experiments/smoke.yaml at batch 64)"
    )
    parser.add_argument("--attn", choices=["dense", "pbs", "both"], help="default: the config's")
    parser.add_argument("--prompt-len", type=int, default=256, help="tokens per prompt")
    parser.add_argument("--steps", type=int, default=2, help="measured generation batches")
    parser.add_argument("--warmup", type=int, default=1, help="generation batches left out")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs of the run the cost is for")
    parser.add_argument("--tiny", action="store_true", help="a CPU-sized model (plumbing)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "grpo_step.md"))
    parser.add_argument("--work", default="/tmp/grpo_step")
    parser.add_argument("--commit")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    if args.prompt_len < 1 or args.steps < 1 or args.warmup < 0 or args.gpus < 1:
        parser.error("--prompt-len, --steps and --gpus must be >= 1, --warmup >= 0")
    return args


def load(args: argparse.Namespace, attn: str | None) -> Any:
    """The config of one row: file, defaults, bench overrides, the user's, then `attn`."""
    from omegaconf import OmegaConf

    from mtrl.config import load_config

    path = Path(args.config) if args.config else DEFAULT_CONFIG
    base = [] if args.config else DEFAULT_OVERRIDES
    if args.gpus > 1:
        # One process of the run: TRL's generation_batch_size is global (aime.yaml's 4096).
        plain = OmegaConf.to_container(load_config(path, [*base, *args.overrides]).train)
        if "generation_batch_size" in plain:
            if plain["generation_batch_size"] % args.gpus:
                raise SystemExit("--gpus must divide train.generation_batch_size")
            base = [
                *base,
                f"train.generation_batch_size={plain['generation_batch_size'] // args.gpus}",
            ]
    attn_override = [f"model.attn_implementation={ATTN[attn]}"] if attn else []
    args.applied = [*base, *BENCH_OVERRIDES, *args.overrides]
    return load_config(path, [*args.applied, *attn_override])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape, shape_name = (
        (TINY_SHAPE, "a tiny Qwen2 shape") if args.tiny else (QWEN25_15B, "Qwen2.5-1.5B's shape")
    )
    variants = ["dense", "pbs"] if args.attn == "both" else [args.attn]
    work = Path(args.work)
    results = []
    for attn in variants:
        cfg = load(args, attn)
        label = attn or (
            "pbs" if cfg.model.attn_implementation == "pbs" else cfg.model.attn_implementation
        )
        result = run(cfg, label, shape, args, work)
        results.append(result)
        print(label, {k: round(v, 3) for k, v in result.seconds.items()}, flush=True)
        # After every row: a run cut short still leaves the rows it measured.
        text = write_report(args, cfg, results, shape_name)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
