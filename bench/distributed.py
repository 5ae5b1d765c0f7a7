"""GRPO on several GPUs: per-GPU memory and step time of ZeRO-2 / ZeRO-3 against one GPU.

One command on a machine with two GPUs runs everything and writes
bench/results/distributed.md (card names, exact commands, the table):

    python bench/distributed.py                  # default: 2 GPUs, 1.5B-shaped random model
    python bench/distributed.py --quick          # tiny shapes, a few steps: checks the plumbing

Needs only torch, transformers, accelerate and peft on the machine, plus the wheels from
`make wheelhouse` installed there (`pip install --no-index --find-links wheelhouse -r
wheelhouse/requirements.txt`); the project itself is used from this checkout (no install).

Runs, each an `accelerate launch` of this file in `--worker` mode with a config from
launch/accelerate/. Every run trains on the same global batch (`--global-batch` completions per
optimizer step) in micro-batches of `--micro-batch` rows per GPU: one GPU accumulates
gradients over twice as many micro-batches as each of two GPUs does.

    single       1 GPU, bf16 weights, no DeepSpeed (launch/accelerate/single_gpu.yaml):
                 the throughput baseline of zero2
    zero2        N GPUs, DeepSpeed ZeRO-2, bf16 weights
    single-fp32  1 GPU, fp32 weights (bf16 autocast), transformers generate: the memory
                 baseline of the ZeRO-3 runs, which keep fp32 master weights and fp32 Adam
                 states (a bf16 baseline would hold fewer bytes a parameter than any ZeRO run)
    zero3        N GPUs, DeepSpeed ZeRO-3 (generation gathers the weights once per rollout)
    zero3-lora   ZeRO-3 with LoRA adapters (model.lora.enabled=true)
    zero3-resume ZeRO-3, stopped after a checkpoint and resumed from it (train.resume=true)
    zero3-1gpu-generate  1 GPU, 1 process, DeepSpeed ZeRO-3, rollouts through transformers
                 generate on the gathered weights (rollout.zero3_weights=generate)
    zero3-1gpu-engine    the same with the fast engine on its own copy of the weights, copied
                 from one gather per rollout (rollout.zero3_weights=copy)

Rollouts use `rollout.engine: auto`: the fast engine for single and zero2; transformers
generate in single-fp32 and, with `rollout.zero3_weights=generate`, in zero3, zero3-lora and
zero3-resume, so that no rollout buffers (the engine's cache, its copy of the weights) stay
allocated between steps and the memory comparison holds model states only. The two zero3-1gpu
runs compare the ZeRO-3 rollout paths on one GPU; the difference of their model states is
the engine's weight copy:

    python bench/distributed.py --gpus 1 --runs zero3-1gpu-generate,zero3-1gpu-engine \
        --global-batch 64 --micro-batch 32 --steps 3 --warmup 1 \
        --out bench/results/distributed_zero3_engine.md

The model is Qwen2.5-1.5B's shape (hidden 1536, 28 layers, 12 heads / 2 KV heads, MLP 8960)
with random weights and the project's small test tokenizer, so its embedding is smaller than
the real model's (vocabulary 1,024 instead of 151,936): ~1.31B parameters instead of 1.54B.
It is built once, in one process, before any launch (building it under ZeRO-3's sharded
init would save empty tensors).

Measured on every rank by a trainer callback: the median step time (CUDA-synchronised, one
optimizer step with its rollout and all its micro-batches, first `--warmup` steps left out),
peak allocated memory over the run (generation and activations included), and "model states":
memory allocated right after the optimizer step, before gradients are zeroed, when parameters,
gradients and optimizer states are what is left (activations are freed after backward). Per
rollout (one `_generate_single_turn` call, CUDA-synchronised): its wall time (gather, copy and
generation), its completion tokens, its backend, and the trainer's `rollout/weight_copy_s`
(gather + copy into the engine's weights; logged under ZeRO-3 with the engine).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.report import git_commit  # noqa: E402

QWEN25_15B = {
    "model.tiny.hidden_size": 1536,
    "model.tiny.num_layers": 28,
    "model.tiny.num_heads": 12,
    "model.tiny.num_kv_heads": 2,
    "model.tiny.intermediate_size": 8960,
}
QUICK = {
    "model.tiny.hidden_size": 256,
    "model.tiny.num_layers": 4,
    "model.tiny.num_heads": 4,
    "model.tiny.num_kv_heads": 2,
    "model.tiny.intermediate_size": 512,
}


# ---------------------------------------------------------------------------------------------
# Worker: one rank of one run


def worker(args: argparse.Namespace) -> int:
    import torch
    from transformers import TrainerCallback

    from mtrl.config import load_config
    from mtrl.run import build_trainer, grpo_config, resume_checkpoint

    cfg = load_config(args.experiment, args.overrides)
    output_dir = grpo_config(cfg).output_dir
    checkpoint = resume_checkpoint(cfg, output_dir)

    cuda = torch.cuda.is_available()  # False only when the worker is tried on a CPU
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    allocated = torch.cuda.memory_allocated if cuda else (lambda: 0)

    class Probe(TrainerCallback):
        def __init__(self):
            self.t0 = None
            self.times: list[float] = []
            self.state_mem: list[int] = []

        def on_step_begin(self, a, state, control, **kw):
            sync()
            self.t0 = time.perf_counter()

        def on_optimizer_step(self, a, state, control, **kw):
            self.state_mem.append(allocated())

        def on_step_end(self, a, state, control, **kw):
            sync()
            self.times.append(time.perf_counter() - self.t0)

    class Logs(TrainerCallback):
        def __init__(self):
            self.weight_copy_s: list[float] = []

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "rollout/weight_copy_s" in logs:
                self.weight_copy_s.append(logs["rollout/weight_copy_s"])

    probe, logs = Probe(), Logs()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = build_trainer(cfg, resume=checkpoint is not None)
    trainer.add_callback(probe)
    trainer.add_callback(logs)
    rollouts: list[dict] = []
    generate_single_turn = trainer._generate_single_turn

    def timed_rollout(prompt_ids, *a, **kw):
        sync()
        t0 = time.perf_counter()
        completions, logprobs = generate_single_turn(prompt_ids, *a, **kw)
        sync()
        rollouts.append(
            {
                "s": time.perf_counter() - t0,
                "tokens": sum(len(c) for c in completions),
                "backend": trainer._rollout.backend,
            }
        )
        return completions, logprobs

    trainer._generate_single_turn = timed_rollout
    rank = trainer.accelerator.process_index
    if rank == 0:
        model = trainer.model
        n_params = sum(
            getattr(p, "ds_numel", p.numel()) for p in model.parameters()
        )  # ZeRO-3 keeps a 0-size placeholder: ds_numel is the real count
        n_train = sum(
            getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad
        )
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(output_dir)
    result = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "step_times": probe.times,
        "state_mem": probe.state_mem,
        "peak_mem": torch.cuda.max_memory_allocated() if cuda else 0,
        "global_step": trainer.state.global_step,
        "resumed_from": checkpoint,
        "ds3_gather_for_generation": trainer.args.ds3_gather_for_generation,
        "rollouts": rollouts,
        "weight_copy_s": logs.weight_copy_s,
        "zero_stage": (
            trainer.accelerator.state.deepspeed_plugin.zero_stage
            if trainer.accelerator.state.deepspeed_plugin
            else None
        ),
    }
    if rank == 0:
        result.update(params=n_params, trainable=n_train)
    Path(args.result).mkdir(parents=True, exist_ok=True)
    (Path(args.result) / f"rank{rank}.json").write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------
# Driver


def launch(name, config, nproc, overrides, args, log_dir, results) -> tuple[str, int, float]:
    result_dir = results / name
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        f"launch/accelerate/{config}",
        "--num_processes",
        str(nproc),
        "--main_process_port",
        str(args.port),
        "bench/distributed.py",
        "--worker",
        "--result",
        str(result_dir),
        args.experiment,
        *[f"{k}={v}" for k, v in overrides.items()],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "4", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    shown = " ".join(shlex.quote(c) for c in ["accelerate", "launch", *cmd[3:]])
    print(f"\n=== {name}: {shown}", flush=True)
    t0 = time.time()
    with open(log_dir / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t0
    print(f"    exit {rc} after {wall:.0f} s (log: {log_dir / f'{name}.log'})", flush=True)
    if rc:
        tail = (log_dir / f"{name}.log").read_text().splitlines()[-25:]
        print("    " + "\n    ".join(tail), flush=True)
    return shown, rc, wall


def summarise(result_dir: Path, warmup: int) -> dict | None:
    ranks = [json.loads(p.read_text()) for p in sorted(result_dir.glob("rank*.json"))]
    if not ranks:
        return None
    r0 = next(r for r in ranks if r["rank"] == 0)
    times = [max(ts) for ts in zip(*(r["step_times"] for r in ranks), strict=False)]
    timed = times[warmup:] or times
    rollouts = r0.get("rollouts", [])[warmup:]
    copies = r0.get("weight_copy_s", [])[warmup:]
    return {
        "gpus": r0["world_size"],
        "device": r0["device"],
        "params": r0.get("params"),
        "trainable": r0.get("trainable"),
        "step_s": statistics.median(timed) if timed else float("nan"),
        "state_gib": max(max(r["state_mem"] or [0]) for r in ranks) / 2**30,
        "peak_gib": max(r["peak_mem"] for r in ranks) / 2**30,
        "global_step": r0["global_step"],
        "resumed_from": r0["resumed_from"],
        "gather": r0["ds3_gather_for_generation"],
        "zero_stage": r0["zero_stage"],
        # rank 0's rollouts after the warm-up ones (one per optimizer step here)
        "rollout_s": statistics.median(x["s"] for x in rollouts) if rollouts else None,
        "rollout_tok_s": (
            sum(x["tokens"] for x in rollouts) / sum(x["s"] for x in rollouts) if rollouts else None
        ),
        "backends": sorted({x["backend"] for x in r0.get("rollouts", [])}),
        "weight_copy_s": statistics.median(copies) if copies else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("experiment", nargs="?", default="experiments/smoke.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=512, help="completions per step")
    parser.add_argument("--micro-batch", type=int, default=32, help="rows per GPU per micro-step")
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--completion-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1, help="steps left out of the timing")
    parser.add_argument("--runs", default="single,zero2,single-fp32,zero3,zero3-lora,zero3-resume")
    parser.add_argument("--quick", action="store_true", help="small model, 3 steps")
    parser.add_argument("--work", default="/tmp/mtrl-bench-distributed")
    parser.add_argument("--port", type=int, default=29533)
    parser.add_argument("--tracking-uri", help="MLflow store (default: sqlite in --work)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "distributed.md"))
    args = parser.parse_intermixed_args()
    if args.worker:
        return worker(args)

    import torch

    if torch.cuda.device_count() < args.gpus:
        print(f"needs {args.gpus} GPUs; found {torch.cuda.device_count()}", file=sys.stderr)
        return 1
    if args.quick:
        args.steps, args.warmup, args.completion_length = 3, 1, 32
        args.global_batch, args.micro_batch = 64, 16
    work = Path(args.work)
    results, logs = work / "results", work / "logs"
    for d in (results, logs):
        d.mkdir(parents=True, exist_ok=True)
    shape = QUICK if args.quick else QWEN25_15B
    base = {
        **shape,
        "model.cache_dir": str(work / "models"),
        "data.size": 4 * args.global_batch,
        "train.max_steps": args.steps,
        "train.num_generations": args.num_generations,
        "train.max_completion_length": args.completion_length,
        "train.save_steps": 10_000,
        "train.logging_steps": 1,
        "train.learning_rate": 1e-6,
        "tracking.uri": args.tracking_uri or f"sqlite:///{work / 'mlflow.db'}",
        "tracking.log_completions": "false",
    }

    # Build the model folder once, in this process (see the module docstring).
    from mtrl.config import load_config
    from mtrl.models import resolve_model_path

    t0 = time.time()
    path = resolve_model_path(
        load_config(
            args.experiment,
            [f"{k}={v}" for k, v in base.items()]
            + [f"train.per_device_train_batch_size={args.micro_batch}"],
        ).model
    )
    print(f"model folder {path} ready in {time.time() - t0:.0f} s", flush=True)

    n = args.gpus
    if args.global_batch % (n * args.micro_batch):
        parser.error(f"--global-batch must be a multiple of {n} x --micro-batch")
    bf16 = {"model.dtype": "bfloat16"}
    fp32 = {"model.dtype": "float32"}
    z3_generate = {**fp32, "rollout.zero3_weights": "generate"}
    runs = {  # name: (accelerate config, processes, overrides)
        "single": ("single_gpu.yaml", 1, bf16),
        "zero2": ("zero2.yaml", n, bf16),
        "single-fp32": ("single_gpu.yaml", 1, {**fp32, "rollout.engine": "hf"}),
        "zero3": ("zero3.yaml", n, z3_generate),
        "zero3-lora": ("zero3.yaml", n, {**z3_generate, "model.lora.enabled": "true"}),
        "zero3-resume": ("zero3.yaml", n, z3_generate),
        "zero3-1gpu-generate": ("zero3.yaml", 1, z3_generate),
        "zero3-1gpu-engine": ("zero3.yaml", 1, {**fp32, "rollout.zero3_weights": "copy"}),
    }
    baseline = {"zero2": "single", "zero3": "single-fp32", "zero3-lora": "single-fp32"}
    baseline["zero3-resume"] = "single-fp32"
    baseline["zero3-1gpu-engine"] = "zero3-1gpu-generate"
    commands: list[tuple[str, str, int]] = []
    for name in args.runs.split(","):
        config, nproc, extra = runs[name]
        over = {
            **base,
            "train.per_device_train_batch_size": args.micro_batch,
            "train.gradient_accumulation_steps": args.global_batch // (nproc * args.micro_batch),
            "train.output_dir": str(work / "out" / name),
            **extra,
        }
        subprocess.run(["rm", "-rf", str(work / "out" / name), str(results / name)])
        if name == "zero3-resume":
            first = {**over, "train.max_steps": 2, "train.save_steps": 2}
            shown, rc, _ = launch(name + "-a", config, nproc, first, args, logs, results)
            commands.append((name + " (first part)", shown, rc))
            over = {**over, "train.max_steps": 4, "train.save_steps": 2, "train.resume": "true"}
        shown, rc, _ = launch(name, config, nproc, over, args, logs, results)
        commands.append((name, shown, rc))

    # Runs from earlier calls with the same --work folder are reported too, so the set can be
    # split over several calls (each under a time limit) and still give one table.
    log_file = work / "commands.json"
    done = json.loads(log_file.read_text()) if log_file.exists() else {}
    done.update({name: [cmd, rc] for name, cmd, rc in commands})
    log_file.write_text(json.dumps(done))
    commands = [(name, cmd, rc) for name, (cmd, rc) in done.items()]
    names = [n for n in runs if (results / n).is_dir()]
    rows = {name: summarise(results / name, args.warmup) for name in names}
    lines = [
        "| run | GPUs | weights | params (trainable) | model states / GPU (GiB) | "
        "vs baseline | peak / GPU (GiB) | step (s) | throughput vs baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if r is None:
            lines.append(f"| {name} | failed | | | | | | | |")
            continue
        base_name = baseline.get(name)
        ref = rows.get(base_name) if base_name else None
        mem = f"{r['state_gib'] / ref['state_gib']:.2f}x {base_name}" if ref else "-"
        speed = f"{ref['step_s'] / r['step_s']:.2f}x {base_name}" if ref else "-"
        params = f"{r['params'] / 1e9:.2f}B ({r['trainable'] / 1e6:.1f}M)" if r["params"] else ""
        lines.append(
            f"| {name} | {r['gpus']} | {runs[name][2]['model.dtype']} | {params} | "
            f"{r['state_gib']:.2f} | {mem} | {r['peak_gib']:.2f} | {r['step_s']:.2f} | {speed} |"
        )
    table = "\n".join(lines)
    rollout_lines = [
        "| run | rollout backend | rollout (s) | completion tokens / s | gather + copy (s) |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if r is not None and r["rollout_s"] is not None:
            copy_s = "-" if r["weight_copy_s"] is None else f"{r['weight_copy_s']:.3f}"
            rollout_lines.append(
                f"| {name} | {', '.join(r['backends'])} | {r['rollout_s']:.2f} | "
                f"{r['rollout_tok_s']:,.0f} | {copy_s} |"
            )
    rollout_table = "\n".join(rollout_lines)
    checks = []
    single, single32 = rows.get("single"), rows.get("single-fp32")
    z2, z3, res = rows.get("zero2"), rows.get("zero3"), rows.get("zero3-resume")
    if single32 and z3:
        ratio = z3["state_gib"] / single32["state_gib"]
        checks.append(
            f"- ZeRO-3 model states per GPU: {ratio:.2f}x one GPU (goal <= 0.55x): "
            f"{'PASS' if ratio <= 0.55 else 'FAIL'}"
        )
    if single and z2:
        speed = single["step_s"] / z2["step_s"]
        checks.append(
            f"- ZeRO-2 throughput on {n} GPUs: {speed:.2f}x one GPU (goal >= 1.7x): "
            f"{'PASS' if speed >= 1.7 else 'FAIL'}"
        )
    if res:
        ok = res["resumed_from"] is not None and res["global_step"] == 4
        checks.append(
            f"- ZeRO-3 save/resume: resumed from {res['resumed_from']}, ended at step "
            f"{res['global_step']} (goal 4): {'PASS' if ok else 'FAIL'}"
        )
    if z3:
        checks.append(
            f"- ZeRO-3 generation: ds3_gather_for_generation={z3['gather']} (the full "
            f"weights are gathered once per rollout); rollouts by {', '.join(z3['backends'])}"
        )
    gen, eng = rows.get("zero3-1gpu-generate"), rows.get("zero3-1gpu-engine")
    if gen and eng and gen["rollout_tok_s"] and eng["rollout_tok_s"]:
        ok = eng["backends"] == ["engine"] and gen["backends"] == ["generate"]
        checks.append(
            f"- ZeRO-3 rollouts on 1 GPU: the engine on its weight copy {eng['rollout_tok_s']:,.0f} "
            f"completion tokens/s against generate's {gen['rollout_tok_s']:,.0f} "
            f"({eng['rollout_tok_s'] / gen['rollout_tok_s']:.1f}x; gather + copy "
            f"{eng['weight_copy_s'] or float('nan'):.3f} s per rollout); step "
            f"{gen['step_s'] / eng['step_s']:.2f}x: {'PASS' if ok else 'FAIL (backends)'}"
        )
    devices = sorted({r["device"] for r in rows.values() if r})
    report = (
        f"""# GRPO on {n} GPUs: DeepSpeed ZeRO-2 / ZeRO-3 against one GPU

Written by `bench/distributed.py` on {time.strftime("%Y-%m-%d %H:%M")}, commit {git_commit(watch=("bench", "mtrl", "launch"))}:
`{shlex.join(["python", "bench/distributed.py", *sys.argv[1:]])}`
Cards: {", ".join(devices)} ({torch.cuda.device_count()} visible); torch {torch.__version__}.

Model: Qwen2.5-1.5B's shape with random weights{" (--quick: small shapes)" if args.quick else ""};
the project's test tokenizer (vocabulary 1,024). Data: reasoning-gym basic_arithmetic.
Global batch {args.global_batch} completions per optimizer step ({args.num_generations} per
prompt) in micro-batches of {args.micro_batch} rows per GPU (gradient accumulation makes up the
rest), {args.completion_length} completion tokens, {args.steps} steps, first {args.warmup} not
timed. Step time: median over timed steps of the slowest rank. Model states: memory allocated
right after the optimizer step, before gradients are zeroed (parameters, gradients, optimizer
states; the highest rank). Peak: the highest rank's peak allocated memory (generation and
activations included). Baselines: zero2 against single (bf16 weights, both with the fast
rollout engine); the ZeRO-3 runs against single-fp32 (fp32 weights and Adam states, as
DeepSpeed's master copy; transformers generate, as in these ZeRO-3 runs); zero3-1gpu-engine
(the fast engine on its copy of the gathered weights) against zero3-1gpu-generate.

{table}

Rollouts (rank 0, after the first {args.warmup}): wall time of a rollout (gather, weight copy
and generation), completion tokens per second over those rollouts, and the trainer's
`rollout/weight_copy_s` (gather + copy into the engine's own weights, ZeRO-3 with the engine).

{rollout_table}

{chr(10).join(checks)}

Commands (from the repository root; `python bench/distributed.py` runs them all):

"""
        + "\n".join(f"- {name} (exit {rc}): `{cmd}`" for name, cmd, rc in commands)
        + "\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print("\n" + table + "\n\n" + rollout_table + "\n\n" + "\n".join(checks))
    print(f"\nwritten: {args.out}")
    return 0 if all(rc == 0 for _, _, rc in commands) else 1


if __name__ == "__main__":
    sys.exit(main())
