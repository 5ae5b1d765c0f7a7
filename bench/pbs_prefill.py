"""Time to first token of a Llama-3.1-8B-shaped model (random bf16 weights), dense vs pbs.

    python bench/pbs_prefill.py --out bench/results/pbs_prefill.md [--commit HASH]

Prefill of one prompt with `logits_to_keep=1`, so only the last position's logits are made.
Random weights give near-uniform attention: the density PBS reaches there is reported; it is
not the density of a trained model.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pbs.hf  # noqa: E402


def ttft(model, ids, reps: int) -> float:
    with torch.no_grad():
        model(ids, logits_to_keep=1, use_cache=False)
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            model(ids, logits_to_keep=1, use_cache=False)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/pbs_prefill.md")
    ap.add_argument("--commit", default=os.environ.get("PBS_COMMIT", "unknown"))
    ap.add_argument("--lengths", default="8192,32768,65536,131072")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    cfg = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=131072, rope_theta=500000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    pbs.hf.register(threshold=args.threshold, min_seq_len=0)
    lines = [
        "## Time to first token (bench/pbs_prefill.py)",
        "",
        f"- card: {torch.cuda.get_device_name()}; date {datetime.date.today()}; "
        f"commit {args.commit}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- model: Llama-3.1-8B shape ({args.layers} layers), random bf16 weights, batch 1, "
        f"prefill with logits_to_keep=1; pbs threshold {args.threshold}, block 128, segment 256",
        "",
        "| N | sdpa (ms) | pbs (ms) | speedup |",
        "|---|---|---|---|",
    ]
    for n in [int(x) for x in args.lengths.split(",")]:
        ids = torch.randint(0, cfg.vocab_size, (1, n), device="cuda")
        reps = 5 if n <= 32768 else 3
        model.set_attn_implementation("sdpa")
        dense = ttft(model, ids, reps)
        model.set_attn_implementation("pbs")
        sparse = ttft(model, ids, reps)
        row = f"| {n} | {dense:.1f} | {sparse:.1f} | {dense / sparse:.2f} |"
        print(row, flush=True)
        lines.append(row)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
