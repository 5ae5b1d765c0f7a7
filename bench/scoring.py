"""Scoring throughput: the sandboxed worker pool (mtrl.scoring) against scoring in-process.

    OMP_NUM_THREADS=1 .venv/bin/python bench/scoring.py [--items 512] [--repeats 5] [--workers 2]

512 completions of reasoning-gym basic_arithmetic problems, as a GRPO step would score them:
half with the right boxed answer, a quarter wrong, a quarter with no box (last-line answer),
and 8 long ones (~20,000 characters of reasoning before the box). Each is scored by the
`accuracy` reward (math-verify) and by the `reasoning_gym` reward (the task's scorer), once
through the pool (what training does) and once by calling the same worker-side functions in
this process (what it did before). The pool is warm (started before timing); each repeat
scores the whole batch. Writes bench/results/scoring.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mtrl import scoring  # noqa: E402
from mtrl.rewards import (  # noqa: E402
    accuracy_reward,
    extract_answer,
    last_boxed,
    math_equal,
    reasoning_gym_reward,
    score_reasoning_gym,
)


def completions(n: int, seed: int = 0) -> tuple[list[str], dict[str, list]]:
    import reasoning_gym

    rng = random.Random(seed)
    data = reasoning_gym.create_dataset("basic_arithmetic", size=n, seed=seed)
    texts, columns = [], {"answer": [], "task": [], "metadata": [], "problem": []}
    for i, entry in enumerate(data):
        gold = str(entry["answer"])
        kind = rng.random()
        shown = gold if kind < 0.5 else str(int(gold) + rng.randint(1, 9))
        reasoning = f"We compute {entry['question'][:80]} step by step. " * 3
        if i % (n // 8) == 0:
            reasoning *= 100  # a long completion
        if kind < 0.75:
            texts.append(f"{reasoning}\nThe answer is $\\boxed{{{shown}}}$.")
        else:
            texts.append(f"{reasoning}\n{shown}")
        columns["answer"].append(gold)
        columns["task"].append("basic_arithmetic")
        columns["metadata"].append(json.dumps(entry["metadata"]))
        columns["problem"].append(entry["question"])
    return texts, columns


def in_process_accuracy(texts: list[str], answer: list[str]) -> list[float]:
    preds = [last_boxed(t) for t in texts]
    return [1.0 if p and math_equal(g, p) else 0.0 for p, g in zip(preds, answer, strict=True)]


def in_process_reasoning_gym(texts: list[str], columns: dict[str, list]) -> list[float]:
    out = []
    for text, gold, meta, question in zip(
        texts, columns["answer"], columns["metadata"], columns["problem"], strict=True
    ):
        entry = {"question": question, "answer": gold, "metadata": json.loads(meta)}
        out.append(score_reasoning_gym("basic_arithmetic", extract_answer(text), entry))
    return out


def timed(fn, repeats: int) -> tuple[list[float], list]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scoring.md")
    args = parser.parse_args()

    scoring.configure(scoring.ScoringConfig(workers=args.workers))
    texts, columns = completions(args.items)
    prompts = [None] * len(texts)
    accuracy_reward(prompts[:4], texts[:4], columns["answer"][:4])  # start the pool: warm
    reasoning_gym_reward(prompts[:4], texts[:4], **{k: v[:4] for k, v in columns.items()})
    in_process_accuracy(texts[:4], columns["answer"][:4])

    cases = {
        "accuracy (math-verify)": (
            lambda: accuracy_reward(prompts, texts, columns["answer"]),
            lambda: in_process_accuracy(texts, columns["answer"]),
        ),
        "reasoning_gym (basic_arithmetic)": (
            lambda: reasoning_gym_reward(prompts, texts, **columns),
            lambda: in_process_reasoning_gym(texts, columns),
        ),
    }
    rows = []
    for name, (pooled, local) in cases.items():
        pool_times, pool_out = timed(pooled, args.repeats)
        local_times, local_out = timed(local, args.repeats)
        assert pool_out == local_out, f"{name}: the pool and in-process scores differ"
        pool_rate = args.items / statistics.median(pool_times)
        local_rate = args.items / statistics.median(local_times)
        rows.append((name, pool_rate, local_rate, sum(pool_out) / len(pool_out)))
        print(f"{name}: pool {pool_rate:.0f} items/s, in-process {local_rate:.0f} items/s")
    counts = scoring_counts()

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
        platform.processor(),
    )
    command = "OMP_NUM_THREADS=1 .venv/bin/python bench/scoring.py " + " ".join(sys.argv[1:])
    lines = [
        "# Scoring: sandboxed worker pool vs in-process",
        "",
        f"- machine: {cpu}, {os.cpu_count()} cores (shared with other jobs), Python "
        f"{platform.python_version()}",
        f"- date: {datetime.date.today()}, commit: {commit}",
        f"- command: `{command.strip()}`",
        f"- {args.items} basic_arithmetic completions (1/2 right, 1/4 wrong, 1/4 unboxed, 8 of "
        f"~20,000 characters), {args.workers} workers, median of {args.repeats} repeats, warm pool",
        f"- timeouts/crashes during the run: {counts}",
        "",
        "| reward | pool items/s | in-process items/s | pool / in-process | mean score |",
        "|---|---|---|---|---|",
    ]
    for name, pool_rate, local_rate, mean in rows:
        lines.append(
            f"| {name} | {pool_rate:.0f} | {local_rate:.0f} | {pool_rate / local_rate:.2f} "
            f"| {mean:.3f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def scoring_counts() -> dict[str, float]:
    from mtrl.rewards import pop_scoring_counts

    return {k: v for k, v in pop_scoring_counts().items() if v}


if __name__ == "__main__":
    main()
