"""Forward + backward of PBS-Attn (triton backend) against cuDNN SDPA and FlexAttention.

    python bench/pbs_backward.py --out bench/results/pbs_backward.md [--commit HASH]
    TRITON_INTERPRET=1 python bench/pbs_backward.py --tiny --out /tmp/pbs_backward.md  # CPU

Shapes: batch 1, 32 query / 8 KV heads, head dim 128, bf16, causal; inputs with planted
"vertical stripe" keys as in bench/pbs_attention.py, threshold picked per length for ~25%
block density. Times (ms) are medians of 3 rounds, each timing every column in turn by
triton.testing.do_bench (its median); each call one forward and one backward (dq, dk, dv)
for a fixed random output gradient:
- "PBS total": pbs_attention (scoring, permutation, selection, attention) and its backward;
- "flex total": the same with ``backend="flex"`` (the same planning code, then compiled
  FlexAttention on the concatenated K/V: what a user of the flex backend runs);
- "PBS attn" / "flex attn": the attention alone over the same plan, our kernels (forward that
  keeps the log-sum-exp, backward kernels) vs compiled FlexAttention on the same block lists.
  The BlockMask, built outside the timing, holds the transposed lists FlexAttention's
  backward walks; our backward builds its own (key-block lists and work items, one host sync)
  inside it;
- "dense": causal SDPA (cuDNN backend; flash where cuDNN refuses, named in the last
  column) on K/V repeated to the query heads outside the timing, gradients taken w.r.t. the
  repeated K/V (the GQA reduction is not timed: a small favour to dense).
"max rel. err." compares PBS's dq, dk, dv with the flex backend's on the same plan.
``--tiny`` checks the plumbing on a CPU through Triton's interpreter (fp16, tiny shapes, wall
clock, PyTorch's math SDPA); FlexAttention has no CPU backward, so there the flex column is
empty and the error is against autograd through the reference. Its times mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from bench.pbs_attention import inputs, threshold_for  # noqa: E402
from bench.report import git_commit, header  # noqa: E402
from pbs import PBSConfig, kernels, pbs_attention, reference_attention  # noqa: E402
from pbs.api import BlockSparseAttention  # noqa: E402
from pbs.flex import block_mask_from_plan, compiled_flex_attention  # noqa: E402
from pbs.plan import density, make_plan  # noqa: E402


def bench(fn, cuda: bool) -> float:
    """Median ms of fn(): on the GPU do_bench over ~2 s (at 128K a call takes up to 0.9 s: a
    400 ms budget timed one call), wall clock of 3 runs (after one) on the CPU."""
    if cuda:
        return triton.testing.do_bench(fn, warmup=10, rep=2000, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def bench_rounds(fns: dict, cuda: bool) -> dict[str, float]:
    """{name: median ms} over 3 rounds (1 on the CPU), each timing every fn in turn, so a
    drift of the GPU's clocks over the run reaches every column alike."""
    times = {name: [] for name in fns}
    for _ in range(3 if cuda else 1):
        for name, fn in fns.items():
            times[name].append(bench(fn, cuda))
    return {name: statistics.median(ts) for name, ts in times.items()}


def dense_backend(dense) -> tuple[str, object]:
    """The first of cuDNN and flash SDPA that runs ``dense`` here: (name, backend)."""
    for name, backend in [
        ("cuDNN", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
    ]:
        try:
            with sdpa_kernel(backend):
                dense()
            return name, backend
        except RuntimeError as exc:  # backend not available for this shape/build
            print(f"{name}: {exc}".splitlines()[0])
    sys.exit("bench/pbs_backward.py: neither cuDNN nor flash SDPA runs this shape")


def fwd_bwd(fn, leaves, do):
    """A closure running out = fn(*leaves); out.backward(do), clearing the leaves' grads."""

    def step():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(do)

    return step


def measure(q, k, v, cfg: PBSConfig, cuda: bool) -> dict:
    """Times (ms) and gradient agreement at one length; q, k, v without grad."""
    n, hq, hkv = q.shape[2], q.shape[1], k.shape[1]
    g = torch.Generator(device=q.device).manual_seed(1)
    do = torch.randn(q.shape, device=q.device, generator=g).to(q.dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    t = {}
    fns = {"pbs_total": fwd_bwd(lambda *x: pbs_attention(*x, config=cfg), leaves, do)}
    # The oracle: the flex backend on a GPU (same plan, FlexAttention's backward); on the CPU,
    # where FlexAttention has no backward, autograd through the reference.
    flex_cfg = dataclasses.replace(cfg, backend="flex")
    oracle = (lambda *x: pbs_attention(*x, config=flex_cfg)) if cuda else (
        lambda *x: reference_attention(*x, config=cfg)
    )  # fmt: skip
    if cuda:
        fns["flex_total"] = fwd_bwd(oracle, leaves, do)
    grads = []
    for fn in (lambda *x: pbs_attention(*x, config=cfg), oracle):
        fwd_bwd(fn, leaves, do)()
        grads.append([x.grad.float() for x in leaves])
    t["rel_err"] = max(((a - b).norm() / b.norm()).item() for a, b in zip(*grads, strict=True))

    with torch.no_grad():
        plan = make_plan(q, k, v, cfg)
    t["density"] = density(plan)[0]
    fns["pbs_attn"] = fwd_bwd(lambda *x: BlockSparseAttention.apply(*x, plan), leaves, do)
    # FlexAttention on the same lists: KV = [permuted, padded to whole blocks ; original].
    bs = cfg.block_size
    padded = -(-n // bs) * bs
    kcat, vcat = (
        torch.cat([F.pad(p, (0, 0, 0, padded - n)), x], 2).requires_grad_()
        for p, x in ((plan.kp, k), (plan.vp, v))
    )  # fmt: skip
    mask = block_mask_from_plan(plan, n, hq)
    flex = compiled_flex_attention()
    opts = {"BLOCK_M": bs, "BLOCK_N": bs} if bs < 128 else None
    if cuda:
        fns["flex_attn"] = fwd_bwd(
            lambda q_, k_, v_: flex(q_, k_, v_, block_mask=mask, scale=plan.scale,
                                    enable_gqa=True, kernel_options=opts),
            [leaves[0], kcat, vcat], do,
        )  # fmt: skip
    ke, ve = (x.repeat_interleave(hq // hkv, 1).requires_grad_() for x in (k, v))
    dense = fwd_bwd(lambda *x: F.scaled_dot_product_attention(*x, is_causal=True),
                    [leaves[0], ke, ve], do)  # fmt: skip
    if cuda:
        t["dense_backend"], backend = dense_backend(dense)

        def dense_on_backend():
            with sdpa_kernel(backend):
                dense()

        fns["dense"] = dense_on_backend
    else:
        t["dense_backend"], fns["dense"] = "math (CPU)", dense
    t.update(flex_total=float("nan"), flex_attn=float("nan"))  # no CPU backward
    t.update(bench_rounds(fns, cuda))
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/pbs_backward.md")
    ap.add_argument("--commit", default=None, help="default: git rev-parse --short HEAD")
    ap.add_argument("--lengths", default=None, help="default: 32768,131072 (--tiny: 96,160)")
    ap.add_argument("--target", type=float, default=0.25, help="block density to aim for")
    ap.add_argument("--tiny", action="store_true", help="CPU plumbing check (interpreter)")
    args = ap.parse_args()
    cuda = not args.tiny
    if cuda and not torch.cuda.is_available():
        sys.exit("bench/pbs_backward.py: needs a CUDA GPU (or --tiny under TRITON_INTERPRET=1)")
    if args.tiny and not kernels.interpreting():
        sys.exit(
            "bench/pbs_backward.py: --tiny runs the kernels on the CPU: set TRITON_INTERPRET=1"
        )
    if args.tiny:
        heads, dtype, device = (4, 2, 32), torch.float16, "cpu"
        base = PBSConfig(block_size=16, segment_size=32, min_seq_len=0)
        card = "CPU (Triton interpreter; --tiny: plumbing only, times mean nothing)"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        heads, dtype, device = (32, 8, 128), torch.bfloat16, "cuda"
        base = PBSConfig(min_seq_len=0)
        card = f"{torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}"
    lengths = [
        int(x) for x in (args.lengths or ("96,160" if args.tiny else "32768,131072")).split(",")
    ]
    lines = header(
        "PBS-Attn forward + backward (bench/pbs_backward.py)", card, git_commit(args.commit)
    )
    lines += [
        f"- shape: batch 1, {heads[0]} q / {heads[1]} kv heads, head dim {heads[2]}, {dtype}, "
        f"causal; block {base.block_size}, segment {base.segment_size}; threshold picked per "
        f"length for ~{args.target:.0%} density",
        "- times in ms (median of 3 rounds), each one forward + one backward (dq, dk, dv); "
        "PBS total includes scoring, permutation and selection; attn columns run the same plan; "
        "dense is SDPA",
        "",
        "| N | thr | density | dense | PBS total | flex total | PBS attn | flex attn "
        "| x dense (total) | flex / PBS total | flex / PBS attn "
        f"| max rel. err. vs {'flex' if cuda else 'reference'} | dense ran |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in lengths:
        q, k, v = (x.to(dtype) for x in inputs(n, device=device, heads=heads))
        thr, _ = threshold_for(q, k, v, args.target, base)
        t = measure(q, k, v, dataclasses.replace(base, threshold=thr), cuda)
        row = (
            f"| {n} | {thr:.3f} | {t['density']:.3f} | {t['dense']:.2f} | {t['pbs_total']:.2f} "
            f"| {t['flex_total']:.2f} | {t['pbs_attn']:.2f} | {t['flex_attn']:.2f} "
            f"| {t['dense'] / t['pbs_total']:.2f} | {t['flex_total'] / t['pbs_total']:.2f} "
            f"| {t['flex_attn'] / t['pbs_attn']:.2f} | {t['rel_err']:.1e} | {t['dense_backend']} |"
        )
        print(row, flush=True)
        lines.append(row)
        del q, k, v
        if cuda:
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
