"""Benchmark: split-KV Triton decode attention against SDPA for one-token decode steps.

    python bench/decode_attention.py --out bench/results/decode_attention.md     # CUDA only

Shape: the rollout engine's decode attention (``_decode_attention``) for Qwen2.5-1.5B: KV heads
2, R = 6 query rows per KV head (12 query heads / 2 KV heads, one query token, GQA folded into
the query length), head dim 128, bf16. K/V are the first n positions of a static cache of
length n + 256 (non-contiguous slices, as in the engine); the mask is additive (B, 1, 1, n)
bf16 with random left padding (at most n/2 keys), 0 or -inf, as the engine builds it.

Variants:
  sdpa             F.scaled_dot_product_attention exactly as the engine calls it (default
                   backend dispatch)
  sdpa-cudnn       the same, restricted to the cuDNN backend
  sdpa-efficient   the same, restricted to the memory-efficient backend
  triton           mtrl.rollout.decode_attention with its default split count and tiles, then
                   every --splits x --block-n x --num-warps x --num-stages (split counts
                   clamped to one BLOCK_N tile per split; repeats skipped). With --append it
                   makes the engine's call: the whole cache of n + 256 positions (mask -inf
                   after n), last_key = n - 1, and the step's key and value written there
  K+V floor        bytes of K and V read once / measured copy bandwidth (a 1 GiB
                   device-to-device copy, read + write counted)

Timing: each variant is captured in a CUDA graph of --calls back-to-back calls and replayed
--reps times; us/call = median replay time / calls, so launch overhead is excluded. The calls
of one graph cycle through several K/V caches (at least 4x the L2 cache in all) so that, as
across a model's layers, K/V come from HBM rather than from L2. Before timing, each variant's
output is compared with the fp32 reference (max abs error; flagged above 5e-2).
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import copy_bandwidth, git_commit, header  # noqa: E402  (bench/ is the script folder)

from mtrl.rollout.decode_attention import (  # noqa: E402
    BLOCK_N,
    NUM_STAGES,
    NUM_WARPS,
    decode_attention,
    decode_attention_reference,
    default_num_splits,
    split_plan,
)

MAX_ERR = 5e-2  # bf16 output of values ~1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="bench/results/decode_attention.md")
    p.add_argument("--batches", default="64,256", help="comma list")
    p.add_argument("--lens", default="256,512,1024,2048,4096", help="key counts n, comma list")
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--rows", type=int, default=6, help="R: query rows per KV head")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--splits", default="1,2,4,8,16", help="fixed split counts for triton")
    p.add_argument("--block-n", default=str(BLOCK_N), help="keys per tile, comma list")
    p.add_argument("--num-warps", default=str(NUM_WARPS), help="comma list")
    p.add_argument("--num-stages", default=str(NUM_STAGES), help="comma list")
    p.add_argument("--append", action="store_true", help="triton: the engine's call (see above)")
    p.add_argument("--calls", type=int, default=20, help="calls per captured graph")
    p.add_argument("--reps", type=int, default=50, help="graph replays timed (median)")
    p.add_argument("--commit", default=None, help="git commit to report (default: git HEAD)")
    return p.parse_args(argv)


def ints(s):
    return [int(x) for x in s.split(",") if x]


def make_inputs(args, batch, n, copies, seed):
    """q, mask and `copies` (k, v) pairs, each a [:, :, :n] slice of a longer cache."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    kvh, r, d = args.kv_heads, args.rows, args.head_dim
    opts = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, kvh, r, d, generator=g, **opts)
    kvs = []
    for _ in range(copies):
        k = torch.randn(batch, kvh, n + 256, d, generator=g, **opts)[:, :, :n]
        v = torch.randn(batch, kvh, n + 256, d, generator=g, **opts)[:, :, :n]
        kvs.append((k, v))
    pads = torch.randint(0, n // 2 + 1, (batch,), generator=g, device="cuda")
    keep = torch.arange(n, device="cuda")[None, :] >= pads[:, None]
    keep = torch.cat([keep, keep.new_zeros(batch, 256)], 1)  # the cache after n: masked
    mask = torch.zeros(batch, n + 256, **opts).masked_fill_(~keep, float("-inf"))
    return q, kvs, mask[:, None, None, :n]


def whole_cache(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The view of all 256 + n positions of the cache whose first n positions t is."""
    shape = list(t.shape)
    shape[dim] += 256
    return t.as_strided(shape, t.stride())


def graph_us(fn, q, kvs, mask, scale, calls, reps) -> float:
    """Median us per call of `calls` calls fn(q, k, v, mask, scale), cycling through the (k, v)
    pairs of kvs, captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: compilation, backend plans
        for k, v in kvs[:2]:
            fn(q, k, v, mask, scale)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(q, *kvs[i % len(kvs)], mask, scale)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


def variants(args, bkv, n):
    """(method, "splits / BLOCK_N / warps / stages" or "-", context factory,
    fn(q, k, v, mask, scale)) for one shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(q, k, v, mask, scale):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    out = [
        ("sdpa", "-", nullcontext, sdpa),
        ("sdpa-cudnn", "-", lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION]), sdpa),
        ("sdpa-efficient", "-", lambda: sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]), sdpa),
    ]
    default = default_num_splits(bkv, n + 256 if args.append else n, torch.device("cuda"))
    last_key = torch.tensor(n - 1, device="cuda")
    seen = set()
    grid = [(default, BLOCK_N, NUM_WARPS, NUM_STAGES)] + list(
        itertools.product(
            ints(args.splits), ints(args.block_n), ints(args.num_warps), ints(args.num_stages)
        )
    )
    for i, (want, block_n, warps, stages) in enumerate(grid):
        tune = dict(block_n=block_n, num_warps=warps, num_stages=stages)
        key = (split_plan(n, want, block_n)[0], block_n, warps, stages)
        if key in seen:
            continue
        seen.add(key)
        label = "triton (default)" if i == 0 else "triton"

        def tri(q, k, v, mask, scale, splits=key[0], tune=tune):
            if not args.append:
                return decode_attention(q, k, v, mask, scale, splits, **tune)
            # The engine passes the whole cache and writes the step's key/value (here the
            # values already at n - 1: the same result).
            return decode_attention(
                q, whole_cache(k, 2), whole_cache(v, 2), whole_cache(mask, 3), scale, splits,
                last_key=last_key, new_k=k[:, :, n - 1 :], new_v=v[:, :, n - 1 :], **tune,
            )  # fmt: skip

        out.append((label, " / ".join(map(str, key)), nullcontext, tri))
    return out


def bench_shape(args, batch: int, n: int, bw: float, l2: int) -> list[dict]:
    """Table rows (floor first, then every variant) for one (batch, n)."""
    scale = 1.0 / math.sqrt(args.head_dim)
    kv_bytes = 2 * batch * args.kv_heads * n * args.head_dim * 2
    copies = max(1, min(args.calls, math.ceil(4 * l2 / kv_bytes)))
    q, kvs, mask = make_inputs(args, batch, n, copies, seed=batch * 100_003 + n)
    ref = decode_attention_reference(q, *kvs[0], mask, scale)
    floor_us = kv_bytes / bw * 1e6
    base = dict(batch=batch, n=n, floor=floor_us, kv_bytes=kv_bytes, err=None, note="")
    rows = [dict(base, method="K+V floor", splits="-", us=floor_us)]
    for method, splits, ctx, fn in variants(args, batch * args.kv_heads, n):
        row = dict(base, method=method, splits=splits, us=float("nan"))
        try:
            with ctx():
                err = (fn(q, *kvs[0], mask, scale).float() - ref).abs().max().item()
                row["err"] = err
                if not err < MAX_ERR:
                    row["note"] = f"WRONG (error above {MAX_ERR})"
                row["us"] = graph_us(fn, q, kvs, mask, scale, args.calls, args.reps)
        except Exception as e:  # noqa: BLE001  (a backend that can't run this shape)
            row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        rows.append(row)
        print(
            f"B={batch} n={n} {method} splits={splits}: {row['us']:.2f} us "
            f"(floor {floor_us:.2f}) err={row['err']} {row['note']}",
            flush=True,
        )
    cudnn_us = next(r["us"] for r in rows if r["method"] == "sdpa-cudnn")
    for row in rows:
        row["cudnn"] = cudnn_us
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench/decode_attention.py: no CUDA device; this benchmark times CUDA-graph replays "
            "on a GPU. Nothing to do."
        )
        return 0
    bw = copy_bandwidth()
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    rows: list[dict] = []
    for batch in ints(args.batches):
        for n in ints(args.lens):
            rows += bench_shape(args, batch, n, bw, l2)
            torch.cuda.empty_cache()
            text = write_table(args, rows, bw, l2)  # after every shape: partial results survive
    print(text)
    return 0


def write_table(args, rows, bw, l2) -> str:
    """Write the markdown table of ``rows`` to --out; returns its text."""
    commit = git_commit(args.commit)
    import triton

    lines = header("Decode attention benchmark", torch.cuda.get_device_name(0), commit) + [
        f"- torch {torch.__version__}, triton {triton.__version__}",
        f"- shape: KV heads {args.kv_heads}, R {args.rows} query rows per KV head, head dim "
        f"{args.head_dim}, bf16; K/V sliced from a cache of n + 256 positions; additive bf16 "
        "(B, 1, 1, n) mask with random left padding",
        "- triton: "
        + (
            "the engine's call (whole cache of n + 256 positions, last_key n - 1, the step's "
            "key and value written)"
            if args.append
            else "K/V slices of n keys, no cache write"
        ),
        f"- copy bandwidth {bw / 1e12:.2f} TB/s (read + write); L2 {l2 / 2**20:.0f} MiB",
        f"- timing: CUDA graph of {args.calls} calls cycling through K/V caches of >= 4x L2 in "
        f"all, median of {args.reps} replays",
        "",
        "us = microseconds per call. x floor = us / K+V floor. TB/s = K+V bytes / time. "
        "x cuDNN = sdpa-cudnn us / us (above 1: faster than cuDNN). err = max abs error "
        "against the fp32 reference.",
        "",
        "| method | B | n | splits / BLOCK_N / warps / stages | us | x floor | TB/s | x cuDNN | err | notes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        err = "-" if r["err"] is None else f"{r['err']:.1e}"
        cudnn = r["cudnn"] / r["us"] if r["method"] != "K+V floor" else None
        lines.append(
            f"| {r['method']} | {r['batch']} | {r['n']} | {r['splits']} | {r['us']:.2f} | "
            f"{r['us'] / r['floor']:.2f} | {r['kv_bytes'] / r['us'] / 1e6:.2f} | "
            f"{'-' if cudnn is None else f'{cudnn:.2f}'} | {err} | {r['note']} |"
        )
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
