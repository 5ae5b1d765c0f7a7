"""Benchmark: one evaluation pass through `mtrl.rollout.generate`, fast engine vs transformers.

    python bench/eval_speed.py                                     # GPU: arith's held-out set
    python bench/eval_speed.py --tiny --out /tmp/eval_speed.md     # CPU: checks the code path

The pass is `mtrl.eval`'s own generation (`mtrl.eval._generate`, what `evaluate` and the
training-time `EvalCallback` run): experiments/arith.yaml's held-out benchmark
(SmolLM2-135M-Instruct, `eval.num_samples` = 4 samples of each of `--problems` problems,
`eval.max_new_tokens` = 160, `eval.batch_size` = 128, T = 0.6, top-p 0.95), once with
`rollout.engine=fast` and once with `rollout.engine=hf`, in the same process, same seed.

Each backend runs the pass twice: the first includes the engine's one-off costs (CUDA-graph
capture, `rollout.compile_decode` compilation), the second is the steady state a periodic
evaluation sees (the engine and its graphs are cached per model and role). Reported: seconds
per pass, generated tokens (EOS included) and tokens/s; the speed-up is steady hf / steady
engine. `--tiny`: the smoke experiment's tiny random model, few problems, short completions.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import git_commit, header  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random model on CPU (code path)")
    p.add_argument("--problems", type=int, default=None, help="held-out problems (default 100)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval_speed.md"))
    p.add_argument("--commit", default=None, help="commit to name in the table (default HEAD)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="experiments/arith.yaml overrides, e.g. a random model of SmolLM2's layer shapes: "
        "model.name=tiny model.tiny.architecture=llama model.tiny.hidden_size=576 "
        "model.tiny.num_layers=30 model.tiny.num_heads=9 model.tiny.num_kv_heads=3 "
        "model.tiny.intermediate_size=1536",
    )
    return p.parse_args(argv)


def timed_pass(model, tokenizer, texts, cfg, engine: str) -> tuple[float, int]:
    """(seconds, generated tokens) of one evaluation pass with `rollout.engine` = `engine`."""
    import torch

    from mtrl.eval import _generate

    cfg.rollout.engine = type(cfg.rollout.engine)(engine)  # the config's enum (auto/fast/hf)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    _, tokens, _ = _generate(model, tokenizer, texts, cfg, False, 0, "bench", False)
    sync()
    return time.perf_counter() - start, sum(tokens)


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    from mtrl.config import load_config
    from mtrl.data import load_prompts
    from mtrl.eval import _render_prompt
    from mtrl.models import load_model_and_tokenizer

    overrides = [] if not args.tiny else ["model.name=tiny", "model.dtype=float32"]
    if args.tiny:
        overrides += ["eval.max_new_tokens=16", "eval.batch_size=8"]
    cfg = load_config(str(ROOT / "experiments" / "arith.yaml"), [*overrides, *args.overrides])
    problems = args.problems or (6 if args.tiny else int(cfg.eval.max_problems or 100))
    model, tokenizer, _ = load_model_and_tokenizer(cfg.model, cfg.pbs)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    bench = cfg.eval.benchmarks[0]
    dataset = load_prompts(bench, tokenizer)
    dataset = dataset.select(range(min(problems, len(dataset))))
    n = int(cfg.eval.num_samples)
    texts = [_render_prompt(p, tokenizer) for p in dataset["prompt"] for _ in range(n)]

    rows = []
    for engine in ("fast", "hf"):
        first = timed_pass(model, tokenizer, texts, cfg, engine)
        steady = timed_pass(model, tokenizer, texts, cfg, engine)
        rows.append((engine, first, steady))
        print(f"{engine}: first {first[0]:.2f} s, steady {steady[0]:.2f} s ({steady[1]} tokens)")
    speedup = rows[1][2][0] / rows[0][2][0]

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    commit = git_commit(args.commit, watch=("mtrl", "bench/eval_speed.py"))
    lines = header("Evaluation pass: fast engine vs transformers generate", card, commit) + [
        "",
        f"Model {cfg.model.name}, {len(dataset)} held-out problems x {n} samples = "
        f"{len(texts)} completions, at most {cfg.eval.max_new_tokens} new tokens, batch "
        f"{cfg.eval.batch_size}, T = {cfg.eval.temperature}, top-p {cfg.eval.top_p}, "
        f"rollout.compile_decode = {cfg.rollout.compile_decode}.",
        "",
        "| rollout.engine | first pass (s) | steady pass (s) | tokens | tokens/s (steady) |",
        "|---|---:|---:|---:|---:|",
    ]
    for engine, (t1, _), (t2, tokens) in rows:
        lines.append(f"| {engine} | {t1:.2f} | {t2:.2f} | {tokens} | {tokens / t2:.0f} |")
    lines += ["", f"Speed-up of the steady pass, hf / fast: {speedup:.2f}x (target >= 5x)."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
