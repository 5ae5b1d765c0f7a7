"""The learning comparison: one temperature vs multi-temperature vs rollout offsets, seeds in parallel.

    python bench/learning.py --out bench/results/learning.md [--seeds 0 1 2] [--steps 60]

Runs `experiments/arith.yaml` (SmolLM2-135M-Instruct, two-term arithmetic, held-out accuracy
on problems of another seed before and during training) once per setting and seed, all at
the same time on one GPU, into one MLflow store; then `launch/compare.py` draws the figures
and this script writes the table with the card, the date, the commit and the commands.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import torch

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {  # run name prefix: overrides of experiments/arith.yaml
    "single": ["sampler.mode=single", "sampler.temperature=1.0"],
    "multi": ["sampler.mode=multi", "sampler.reasoning_fraction=0.2"],
    "offsets": [
        "sampler.mode=single",
        "sampler.temperature=1.0",
        "sampler.rollout_offsets=true",
    ],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/learning.md")
    parser.add_argument("--work", default="runs/learning", help="outputs and the MLflow store")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--timeout", type=float, default=540, help="seconds for all runs")
    parser.add_argument("--commit", help="the commit measured (default: git's HEAD)")
    parser.add_argument(
        "--tracking-uri",
        help="MLflow store (default: sqlite in --work; file:... for mlflow-skinny)",
    )
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run")
    args = parser.parse_args()

    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    uri = args.tracking_uri or f"sqlite:///{work / 'mlflow.db'}"
    commands = {}
    for setting, overrides in SETTINGS.items():
        for seed in args.seeds:
            name = f"{setting}-s{seed}"
            commands[name] = [
                sys.executable,
                str(ROOT / "launch" / "train.py"),
                str(ROOT / "experiments" / "arith.yaml"),
                *overrides,
                f"train.seed={seed}",
                f"train.max_steps={args.steps}",
                f"train.output_dir={work / name}",
                f"tracking.uri={uri}",
                f"tracking.run_name={name}",
                *args.overrides,
            ]
    # Create the store before the runs start: concurrent first use races on its schema.
    client = mlflow.MlflowClient(uri)
    if client.get_experiment_by_name("arith") is None:
        client.create_experiment("arith")
    start = time.time()
    procs = {}
    for name, command in commands.items():
        log = open(work / f"{name}.log", "w")  # noqa: SIM115 (closed below)
        procs[name] = (
            subprocess.Popen(command, cwd=work, stdout=log, stderr=subprocess.STDOUT),
            log,
        )
    failed = []
    for name, (proc, log) in procs.items():
        try:
            proc.wait(timeout=max(1.0, args.timeout - (time.time() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if proc.returncode != 0:
            failed.append((proc.returncode, name))
    minutes = (time.time() - start) / 60

    report = Path(args.out).resolve().with_suffix("")
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "compare.py"),
            "--experiment",
            "arith",
            "--tracking-uri",
            uri,
            "--out",
            str(report),
            "--name",
            "learning",
        ],
        check=True,
    )
    commit = (
        args.commit
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    )
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    lines = [
        "# Learning: one temperature vs multi-temperature vs rollout offsets",
        "",
        f"- card: {card}; date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
        f"commit: {commit}",
        f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"- {len(commands)} runs at once on the one card, {minutes:.1f} min wall time; "
        f"{len(failed)} did not finish (exit status or timeout)",
        "- each run: `python launch/train.py experiments/arith.yaml <setting> train.seed=S "
        f"train.max_steps={args.steps}`, settings:",
        *[f"  - {setting}: `{' '.join(o)}`" for setting, o in SETTINGS.items()],
        "",
        (report / "report.md").read_text(),
    ]
    for code, name in failed:
        lines.append(f"- {name} did not finish: status {code}, see its log")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
