"""Benchmark: the Triton skinny GEMM (mtrl.rollout.skinny_gemm) against cuBLAS (F.linear) for a
decode step's projections, each against the weight-read floor.

    python bench/skinny_gemm.py                      # CUDA: writes bench/results/skinny_gemm.md
    python bench/skinny_gemm.py --rows 64 --sweep tiles      # a shorter run
    TRITON_INTERPRET=1 python bench/skinny_gemm.py --tiny    # CPU plumbing: writes to $TMPDIR

Shapes (``--shapes``, from bench/shapes.py's Qwen2.5-1.5B, or its tiny model with --tiny), each
y = x @ W^T (+ b) (+ r) with x (M, K), W (N, K), at every M of ``--rows`` (default 64, 256):
  qkv         q/k/v fused (as ``mtrl.rollout.fused`` runs them): N 2048, K 1536, with bias
  o_proj      N 1536, K 1536
  gate_up     gate/up fused: N 17920, K 1536
  down        N 1536, K 8960
  lm_head     N 151936, K 1536
  o_proj+res, down+res   (not in the default list) the same with a residual added: cuBLAS
              runs ``r + F.linear(x, W)``, the Triton kernel adds r in its epilogue
dtype bf16 on CUDA (fp16 on the CPU: Triton's interpreter mishandles bf16).

Rows of the table, per (shape, M):
  cuBLAS       F.linear (and the residual add), PyTorch's default dispatch
  default      skinny_linear with ``default_config`` for this device's SM count
  best         the fastest config of the sweep (the default included)
Sweep (``--sweep``): ``tiles`` times every tile shape (BLOCK_M: M's power of two up to 64, and
128 for M > 64; BLOCK_N 16..128; BLOCK_K 64, 128) with every power-of-two SPLIT_K up to 16
that keeps at most 16 programs per SM (4 warps, 3 stages); ``full`` (CUDA default) then, for
the two fastest tile shapes, varies num_warps (4, 8), num_stages (2..5) and swap_ab, and
halves and doubles BLOCK_K; ``none`` times the default only. Configs whose pipeline can't fit
an H100's shared memory are skipped. Past --budget-s seconds (default 480, so that a run fits
in 10 minutes) the remaining shapes are timed without a sweep (their rows say so). The sweep
section of the report lists the fastest --top configs of each shape.

Floor: weight bytes (N * K * 2) / the device's copy bandwidth (a 1 GiB device-to-device copy,
read + write counted: ``report.copy_bandwidth``, as bench/rollout.py). eff = floor / time.

Timing (CUDA): ``triton.testing.do_bench_cudagraph`` (median of replays of a graph of
back-to-back calls, launch overhead excluded). As across a model's layers, the calls cycle
through copies of W (at least 4x the L2 cache in all), so the weight is read from HBM, not L2;
x (and r) stay the same, as a layer's input would be in L2. CPU (--tiny): host clock, median of
--reps calls; the times mean nothing there. Before timing, each method's output is compared
with ``skinny_linear_reference`` (fp32 product); "WRONG" flags one out of tolerance.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import copy_bandwidth, git_commit, header  # noqa: E402  (bench/ is the script folder)
from shapes import QWEN25_15B, TINY  # noqa: E402  (bench/ is the script folder)

from mtrl.rollout.skinny_gemm import (  # noqa: E402
    SkinnyConfig,
    default_config,
    device_sm_count,
    skinny_linear,
    skinny_linear_reference,
)

DEFAULT_SHAPES = "qkv,o_proj,gate_up,down,lm_head"
OUT = "bench/results/skinny_gemm.md"
TINY_OUT = str(Path(tempfile.gettempdir()) / "skinny_gemm_tiny.md")  # not a result to keep
SMEM_PER_BLOCK = 227 * 1024  # H100; configs whose pipeline can't fit are not tried
# Max |error| against the fp32 reference, relative to 1 + |ref| (outputs of size ~1).
TOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float32: 1e-4}


def projection_shapes(cfg: dict) -> dict[str, tuple[int, int, bool, bool]]:
    """{name: (N, K, bias, residual)} of a decoder's projections (transformers config kwargs)."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // heads
    return {
        "qkv": ((heads + 2 * kv) * d, h, True, False),
        "o_proj": (heads * d, h, False, False),
        "gate_up": (2 * inter, h, False, False),
        "down": (h, inter, False, False),
        "lm_head": (cfg["vocab_size"], h, False, False),
        "o_proj+res": (h, heads * d, False, True),
        "down+res": (h, inter, False, True),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=None, help=f"default {OUT} ({TINY_OUT} with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU plumbing check)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma list (see above)")
    p.add_argument("--rows", default=None, help="values of M, comma list (default 64,256; tiny 3)")
    p.add_argument("--sweep", choices=("none", "tiles", "full"), default=None)
    p.add_argument("--rep", type=int, default=10, help="CUDA: ms of calls per timed graph")
    p.add_argument("--reps", type=int, default=5, help="CPU: calls timed (median)")
    p.add_argument(
        "--budget-s", type=float, default=480, help="no sweep after this many seconds (0: none)"
    )
    p.add_argument("--top", type=int, default=8, help="configs per shape in the sweep section")
    p.add_argument("--commit", default=None, help="git commit to report (default: git HEAD)")
    args = p.parse_args(argv)
    args.out = args.out or (TINY_OUT if args.tiny else OUT)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.cuda = args.device.type == "cuda"
    args.rows = [int(v) for v in (args.rows or ("3" if args.tiny else "64,256")).split(",") if v]
    args.sweep = args.sweep or ("full" if args.cuda and not args.tiny else "tiles")
    args.dtype = torch.bfloat16 if args.cuda else torch.float16
    known = projection_shapes(TINY if args.tiny else QWEN25_15B)
    args.shapes = [s for s in args.shapes.split(",") if s]
    bad = [s for s in args.shapes if s not in known]
    if bad:
        p.error(f"unknown shapes {bad}; known: {', '.join(known)}")
    args.shape_dims = {s: known[s] for s in args.shapes}
    return args


def _pow2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << max(0, (v - 1).bit_length())))


def fits(c: SkinnyConfig, elem: int = 2) -> bool:
    """Whether num_stages buffers of the x and W tiles fit an H100 block's shared memory."""
    return c.num_stages * (c.block_m + c.block_n) * c.block_k * elem <= SMEM_PER_BLOCK


def effective(c: SkinnyConfig, m: int, n: int, k: int) -> SkinnyConfig:
    """The config as the launcher runs it: split_k clamped to the BLOCK_K tiles of K."""
    return replace(c, split_k=min(c.split_k, max(1, math.ceil(k / c.block_k))))


def tile_configs(m: int, n: int, k: int, sms: int) -> list[SkinnyConfig]:
    """The sweep's first stage: tile shapes and splits, 4 warps, 3 stages (see the docstring)."""
    out = []
    block_ms = [_pow2(m, 16, 64)] + ([128] if m > 64 else [])
    for bm in block_ms:
        m_tiles = math.ceil(m / bm)
        for bn in (16, 32, 64, 128):
            if bn > _pow2(n, 16, 256):
                continue
            tiles = m_tiles * math.ceil(n / bn)
            for bk in sorted({_pow2(k, 16, b) for b in (64, 128)}):
                k_tiles = math.ceil(k / bk)
                for split in (1, 2, 4, 8, 16):
                    if split > k_tiles or (split > 1 and tiles * split > 16 * sms):
                        continue
                    out.append(SkinnyConfig(bm, bn, bk, split, num_warps=4, num_stages=3))
    return [c for c in out if fits(c)]


def tuning_configs(base: SkinnyConfig) -> list[SkinnyConfig]:
    """The sweep's second stage around one tile shape: warps, stages, swap_ab; and BLOCK_K
    halved and doubled (16..256)."""
    out = [
        replace(base, num_warps=w, num_stages=s, swap_ab=swap)
        for w in (4, 8)
        for s in (2, 3, 4, 5)
        for swap in (False, True)
    ]
    out += [replace(base, block_k=bk) for bk in (base.block_k // 2, base.block_k * 2)]
    return [c for c in out if 16 <= c.block_k <= 256 and fits(c)]


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.sms = device_sm_count(self.device)
        self.bw = copy_bandwidth(self.device, (1 << 30) if args.cuda else (1 << 24))
        props = torch.cuda.get_device_properties(self.device) if args.cuda else None
        self.l2 = getattr(props, "L2_cache_size", 50 << 20) if props is not None else 0
        self.results: list[dict] = []  # one per (shape, M)
        self.t0 = time.perf_counter()

    def over_budget(self) -> bool:
        return self.args.budget_s > 0 and time.perf_counter() - self.t0 > self.args.budget_s

    # -------------------------------------------------------------- inputs and timing
    def inputs(self, n: int, k: int, m: int, has_bias: bool, has_res: bool, seed: int):
        """x (m, k); W copies (n, k) of >= 4x L2 in all (CUDA; one elsewhere); bias; residual."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        opts = dict(device=self.device, dtype=self.args.dtype)
        w_bytes = n * k * self.args.dtype.itemsize
        copies = max(1, min(64, math.ceil(4 * self.l2 / w_bytes))) if self.args.cuda else 1
        ws = [torch.randn(n, k, generator=g, **opts) / math.sqrt(k) for _ in range(copies)]
        x = torch.randn(m, k, generator=g, **opts)
        b = torch.randn(n, generator=g, **opts) if has_bias else None
        r = torch.randn(m, n, generator=g, **opts) if has_res else None
        return x, ws, b, r

    def time_us(self, fn_at, copies: int) -> float:
        """Median microseconds of one call fn_at(i), the calls cycling i through the copies."""
        state = [0]

        def fn():
            fn_at(state[0] % copies)
            state[0] += 1

        if self.args.cuda:
            from triton.testing import do_bench_cudagraph

            return do_bench_cudagraph(fn, rep=self.args.rep, return_mode="median") * 1e3
        fn()  # compile (interpreter: nothing)
        times = []
        for _ in range(self.args.reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6

    def measure(self, fn_at, copies: int, ref: torch.Tensor) -> dict:
        """{us, err, note} of one method: checked against ref on copy 0, then timed."""
        row = dict(us=float("nan"), err=None, note="")
        try:
            out = fn_at(0)
            err = ((out.float() - ref).abs() / (1 + ref.abs())).max().item()
            row["err"] = err
            if not err <= TOL[self.args.dtype]:
                row["note"] = "WRONG"
            row["us"] = self.time_us(fn_at, copies)
        except Exception as e:  # noqa: BLE001  (a config that can't compile or run)
            row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
        return row

    # -------------------------------------------------------------- one (shape, M)
    def shape(self, name: str, m: int) -> dict:
        args = self.args
        n, k, has_bias, has_res = args.shape_dims[name]
        x, ws, b, r = self.inputs(n, k, m, has_bias, has_res, seed=m * 1_000_003 + n + k)
        ref = skinny_linear_reference(x, ws[0], b, r).float()
        floor_us = n * k * args.dtype.itemsize / self.bw * 1e6
        res = dict(shape=name, m=m, n=n, k=k, bias=has_bias, residual=has_res, floor=floor_us)

        def cublas(i):
            y = F.linear(x, ws[i], b)
            return y if r is None else r + y

        res["cublas"] = self.measure(cublas, len(ws), ref)

        def triton_fn(config):
            return lambda i: skinny_linear(x, ws[i], b, r, config)

        default = effective(default_config(m, n, k, self.sms), m, n, k)
        timed: dict[SkinnyConfig, dict] = {default: self.measure(triton_fn(default), len(ws), ref)}
        res["default"] = default
        res["note"] = ""
        if args.sweep != "none" and self.over_budget():
            res["note"] = f"no sweep: past --budget-s {args.budget_s:g}"
        elif args.sweep != "none":
            stage = [effective(c, m, n, k) for c in tile_configs(m, n, k, self.sms)]
            self.run(stage, timed, triton_fn, len(ws), ref, f"{name} M={m}")
            if args.sweep == "full":
                ok = [c for c in stage if not timed[c]["note"]]  # ran, and right
                ok.sort(key=lambda c: timed[c]["us"])
                for base in ok[:2]:
                    self.run(tuning_configs(base), timed, triton_fn, len(ws), ref, f"{name} M={m}")
        res["timed"] = timed
        good = {c: t for c, t in timed.items() if t["us"] == t["us"] and t["note"] != "WRONG"}
        res["best"] = min(good, key=lambda c: good[c]["us"]) if good else None
        return res

    def run(self, configs, timed, triton_fn, copies, ref, what) -> None:
        """Measure each config not yet in ``timed`` (by the config the launcher runs)."""
        for c in configs:
            if c in timed:
                continue
            timed[c] = t = self.measure(triton_fn(c), copies, ref)
            print(f"  {what} {c.label}: {t['us']:.2f} us {t['note']}", flush=True)

    # -------------------------------------------------------------- report
    def write(self) -> str:
        args = self.args
        commit = git_commit(
            args.commit, watch=("mtrl/rollout/skinny_gemm.py", "bench/skinny_gemm.py")
        )
        if args.cuda:
            card = torch.cuda.get_device_name(self.device)
        else:
            card = f"cpu ({platform.processor() or platform.machine()}, Triton interpreter)"
        import triton

        reduced = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
        lines = header("Skinny GEMM benchmark", card, commit) + [
            f"- torch {torch.__version__}, triton {triton.__version__}; {args.dtype}; "
            f"{self.sms} SMs; cuBLAS bf16 reduced-precision reduction allowed: {reduced}",
            f"- shapes: {'tiny model' if args.tiny else 'Qwen2.5-1.5B'} projections; "
            f"sweep: {args.sweep}",
            f"- copy bandwidth {self.bw / 1e12:.3f} TB/s (read + write counted); "
            f"L2 {self.l2 / 2**20:.0f} MiB",
            "- timing: "
            + (
                f"triton.testing.do_bench_cudagraph (median, {args.rep} ms of calls per graph), "
                "the calls cycling through copies of W of >= 4x L2 in all"
                if args.cuda
                else f"host clock, median of {args.reps} calls (CPU: meaningless)"
            ),
            "",
            "us = microseconds per call. floor = W bytes (N x K x 2) / copy bandwidth. "
            "eff = floor / us. x cuBLAS = cuBLAS us / us (above 1: faster). Configs: "
            "BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages (p), swap_ab. "
            "err = max |out - ref| / (1 + |ref|) against the fp32 reference.",
            "",
            "| shape | M | N | K | floor us | cuBLAS us | cuBLAS eff | default config | default us "
            "| default eff | best config | best us | best eff | best x cuBLAS | err | notes |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- | ---: "
            "| ---: | ---: | ---: | --- |",
        ]

        def f(v, fmt=".2f"):
            return "-" if v is None or v != v else format(v, fmt)

        def pct(floor, us):
            return "-" if us is None or us != us else f"{floor / us * 100:.0f}%"

        for res in self.results:
            cb, fl = res["cublas"], res["floor"]
            d = res["timed"][res["default"]]
            best = res["best"]
            bt = res["timed"][best] if best is not None else dict(us=None, err=None)
            errs = [t["err"] for t in (cb, d, bt) if t["err"] is not None]
            notes = [
                f"{who}: {t['note']}" for who, t in (("cuBLAS", cb), ("default", d)) if t["note"]
            ]
            if res["note"]:
                notes.append(res["note"])
            wrong = [c.label for c, t in res["timed"].items() if t["note"] == "WRONG"]
            if wrong:
                notes.append(f"WRONG: {', '.join(wrong)}")
            name = res["shape"] + (" (bias)" if res["bias"] else "")
            lines.append(
                f"| {name} | {res['m']} | {res['n']} | {res['k']} | {f(fl)} | {f(cb['us'])} "
                f"| {pct(fl, cb['us'])} | {res['default'].label} | {f(d['us'])} "
                f"| {pct(fl, d['us'])} | {best.label if best else '-'} | {f(bt['us'])} "
                f"| {pct(fl, bt['us'])} "
                f"| {f(cb['us'] / bt['us'] if bt['us'] else None)} "
                f"| {f(max(errs) if errs else None, '.1e')} | {'; '.join(notes)} |"
            )
        if args.sweep != "none":
            lines += ["", f"## Sweep: the {args.top} fastest configs per shape", ""]
            lines += [
                "| shape | M | config | us | eff | x cuBLAS |",
                "| --- | ---: | --- | ---: | ---: | ---: |",
            ]
            for res in self.results:
                ranked = sorted(
                    (
                        c
                        for c, t in res["timed"].items()
                        if t["us"] == t["us"] and t["note"] != "WRONG"
                    ),
                    key=lambda c: res["timed"][c]["us"],
                )
                cb = res["cublas"]["us"]
                for c in ranked[: args.top]:
                    us = res["timed"][c]["us"]
                    mark = " (default)" if c == res["default"] else ""
                    lines.append(
                        f"| {res['shape']} | {res['m']} | {c.label}{mark} | {us:.2f} "
                        f"| {pct(res['floor'], us)} | {f(cb / us)} |"
                    )
        text = "\n".join(lines) + "\n"
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        return text


def main(argv=None) -> str:
    """Time every (shape, M); the table is rewritten after each. Returns its text."""
    args = parse_args(argv)
    bench = Bench(args)
    text = ""
    for m in args.rows:
        for name in args.shapes:
            print(f"{name} M={m}", flush=True)
            bench.results.append(bench.shape(name, m))
            if args.cuda:
                torch.cuda.empty_cache()  # the shape's weight copies
            text = bench.write()
    print(text)
    return text


if __name__ == "__main__":
    main()
