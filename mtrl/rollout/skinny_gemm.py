"""Skinny GEMM for decode-time projections: y = x @ W^T (+ bias) (+ residual), few rows of x.

    y = skinny_linear(x, weight, bias, residual)       # (..., N) in x's dtype
    y = skinny_linear(x, weight, config=SkinnyConfig(block_n=32, split_k=4))

Shapes and units:
  x:        (..., K), rows M = prod(leading dims), meant for M <= 256 (decode batches); any
            row stride, unit stride along K (a copy is made otherwise)
  weight:   (N, K), an ``nn.Linear`` weight read in place: unit stride along K, any row stride
            (a row or column block of a larger buffer is fine), never copied
  bias:     (N,) or None, any float dtype
  residual: (..., N) like the output, x's dtype, or None; any row stride, unit stride along N
  out:      (..., N), contiguous, x's dtype
x and weight: fp16, bf16 or fp32, the same dtype. Accumulation is fp32.

Why: at M = 64 a projection GEMM is memory-bound: the weight, N * K * 2 bytes in bf16, must
be streamed once from HBM, which needs every SM issuing loads. For Qwen2.5-1.5B's small
projections (N = 1536 or 2048) cuBLAS's tile choices don't get there (o_proj ran at 21% of
its weight-read floor on an H100, q/k/v at 27%). Here the grid is sized to the GPU:
1. ``_linear_tiles_kernel``: one program computes a (BLOCK_M, BLOCK_N) tile of x @ W^T over
   one chunk of K (``tl.dot`` of BLOCK_K-wide slices, fp32 accumulator). With SPLIT_K = 1 its
   epilogue adds bias and residual and stores y; with SPLIT_K > 1 the K tiles are divided
   evenly (whole BLOCK_K tiles, sizes differing by at most one tile) over SPLIT_K programs
   per output tile, each writing an fp32 partial (SPLIT_K, M, N) to a workspace.
2. ``_sum_k_splits_kernel`` (SPLIT_K > 1 only): sums the partials in split order (a
   deterministic two-pass reduction, no atomics) and runs the same epilogue.
Program order: the M tiles of one (N tile, K chunk) are adjacent program ids, so they run
together and read that weight block from L2 after the first; the weight is streamed from
HBM about once also when M spans several BLOCK_M tiles.

Numerics (``skinny_linear_reference`` is the oracle): acc = sum_k x * w in fp32; then
y = round(acc + bias) to x's dtype (``F.linear``'s single rounding, bias added in fp32 as in
cuBLAS's bias epilogue); with a residual, out = round(y + residual) (torch's add of two
tensors of x's dtype). So ``skinny_linear(x, w, b, r)`` equals ``r + F.linear(x, w, b)`` up
to the summation order of the dot product. fp32 inputs use IEEE fp32 dots (no TF32) on a GPU.

Graph capture: the launch reads shapes only (no host synchronisation, no ``.item()``); the
output and the split-K workspace come from ``torch.empty`` (the graph's pool when captured).
Tile shapes are fixed launch parameters (``SkinnyConfig``), not autotuned: the first call with
a config compiles, later calls and captures reuse the kernel. ``default_config`` is the
heuristic (tuned for an H100's 132 SMs); ``bench/skinny_gemm.py`` sweeps configs.
Triton runs the kernels on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
H100_SMS = 132
# The default grid aims at this many programs per SM (the K split fills in what N tiles lack).
PROGRAMS_PER_SM = 2
MAX_SPLIT_K = 16
# Stand-in SM count for the heuristic off CUDA (the interpreter): small grids.
CPU_SMS = 4
# Shared memory: an H100 SM has 228 KiB (227 KiB at most per block). The default config's
# pipeline (num_stages buffers of the x and W tiles) stays within SMEM_BUDGET, and within an
# equal share of the SM when up to MAX_RESIDENT programs per SM are to run at once.
SMEM_PER_SM = 228 * 1024
SMEM_BUDGET = 160 * 1024
MAX_RESIDENT = 4
# The finishing kernel's tile (rows x columns of the output): small on a GPU, for many programs
# (M = 64, N = 2048: 256); large elsewhere, where the interpreter's cost is per program.
SUM_TILE = {"cuda": (4, 128), "other": (64, 256)}


@dataclass(frozen=True)
class SkinnyConfig:
    """Launch parameters of ``skinny_linear``.

    block_m, block_n, block_k: tile sizes (rows of x, rows of W = output columns, reduction
    width), powers of two >= 16 (``tl.dot``'s minimum); block_m <= 256, block_n <= 256,
    block_k <= 512. split_k: programs sharing the K range of one output tile (clamped to the
    number of BLOCK_K tiles in K); > 1 adds the fp32 workspace and the finishing kernel.
    num_warps, num_stages: Triton's (warps per program, software-pipeline depth of the K loop).
    swap_ab: compute the tile as (W_tile @ x_tile^T)^T, so that BLOCK_N is the MMA's M
    dimension (can suit block_m < 64).
    """

    block_m: int = 64
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False

    def __post_init__(self):
        for name, lo, hi in (("block_m", 16, 256), ("block_n", 16, 256), ("block_k", 16, 512)):
            v = getattr(self, name)
            if not (lo <= v <= hi and v & (v - 1) == 0):
                raise ValueError(f"{name} must be a power of two in {lo}..{hi}, got {v}")
        if self.split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {self.split_k}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")

    @property
    def label(self) -> str:
        """Short name for tables: ``m64 n64 k128 s4 w4 p3`` (+ `` swap``)."""
        return (
            f"m{self.block_m} n{self.block_n} k{self.block_k} s{self.split_k} "
            f"w{self.num_warps} p{self.num_stages}" + (" swap" if self.swap_ab else "")
        )


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _bias_residual_store(
    acc, offs_m, offs_n, M, N, BIAS, RES, srm, Y, sym,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    """Store round(round(acc + bias) + residual) for the (rows offs_m, columns offs_n) tile.

    acc: fp32 (len(offs_m), len(offs_n)); rows >= M and columns >= N are not stored. BIAS (N,);
    RES, Y: (M, N) with row strides srm, sym, unit column stride; roundings to Y's dtype.
    """
    ok_m = offs_m < M
    ok_n = offs_n < N
    ok = ok_m[:, None] & ok_n[None, :]
    rows = offs_m.to(tl.int64)
    if HAS_BIAS:
        b = tl.load(BIAS + offs_n, mask=ok_n, other=0.0)
        acc = acc + b.to(tl.float32)[None, :]
    y = acc.to(Y.dtype.element_ty)
    if HAS_RESIDUAL:
        r = tl.load(RES + rows[:, None] * srm + offs_n[None, :], mask=ok, other=0.0)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(Y.dtype.element_ty)
    tl.store(Y + rows[:, None] * sym + offs_n[None, :], y, mask=ok)


@triton.jit
def _linear_tiles_kernel(
    X, W, BIAS, RES, Y, PART,
    M, N, K, sxm, swn, srm, sym, k_tiles, splits, m_tiles,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, SPLIT: tl.constexpr, SWAP_AB: tl.constexpr, IEEE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    """One (BLOCK_M, BLOCK_N) tile of x @ W^T over one chunk of K.

    Grid: (m_tiles * splits * cdiv(N, BLOCK_N),), program id = (n_tile * splits + split) *
    m_tiles + m_tile. X (M, K), W (N, K) with row strides sxm, swn and unit stride along K.
    Split s sums the BLOCK_K tiles [s * k_tiles // splits, (s + 1) * k_tiles // splits).
    EVEN_K: K % BLOCK_K == 0 (no K masks). Rows of x past M and of W past N are clamped to
    the last row when loading (valid addresses, no masks); their results are not stored.
    SPLIT: write the fp32 partial to PART (splits, M, N); else the epilogue writes Y (M, N).
    """
    pid = tl.program_id(0)
    pid_m = pid % m_tiles
    rest = pid // m_tiles
    pid_k = rest % splits
    pid_n = rest // splits

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows_x = tl.minimum(offs_m, M - 1).to(tl.int64)
    rows_w = tl.minimum(offs_n, N - 1).to(tl.int64)
    x_ptrs = X + rows_x[:, None] * sxm + offs_k[None, :]
    w_ptrs = W + rows_w[:, None] * swn + offs_k[None, :]

    k_start = (pid_k * k_tiles // splits) * BLOCK_K
    k_end = tl.minimum(((pid_k + 1) * k_tiles // splits) * BLOCK_K, K)
    if SWAP_AB:
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs + k)
            w = tl.load(w_ptrs + k)
        else:
            ok_k = (k + offs_k) < K
            x = tl.load(x_ptrs + k, mask=ok_k[None, :], other=0.0)
            w = tl.load(w_ptrs + k, mask=ok_k[None, :], other=0.0)
        if SWAP_AB:
            if IEEE:
                acc_t = tl.dot(w, tl.trans(x), acc_t, input_precision="ieee")
            else:
                acc_t = tl.dot(w, tl.trans(x), acc_t)
        else:
            if IEEE:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
    if SWAP_AB:
        acc = tl.trans(acc_t)

    if SPLIT:
        rows = (pid_k * M + offs_m).to(tl.int64)
        ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        tl.store(PART + rows[:, None] * N + offs_n[None, :], acc, mask=ok)
    else:
        _bias_residual_store(
            acc, offs_m, offs_n, M, N, BIAS, RES, srm, Y, sym, HAS_BIAS, HAS_RESIDUAL
        )


@triton.jit
def _sum_k_splits_kernel(
    PART, BIAS, RES, Y, M, N, srm, sym, splits,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    """Sum the fp32 partials PART (splits, M, N) over splits (in order), then the epilogue.

    Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)); one (BLOCK_M, BLOCK_N) tile of Y (M, N).
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = PART + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    step = tl.cast(M, tl.int64) * N  # tl.cast: M == 1 arrives as a constexpr on a GPU
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(ptrs + s * step, mask=ok, other=0.0)
    _bias_residual_store(acc, offs_m, offs_n, M, N, BIAS, RES, srm, Y, sym, HAS_BIAS, HAS_RESIDUAL)


# ----------------------------------------------------------------------------- host side
@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sm_count(device: torch.device | str) -> int:
    """SMs of a CUDA device; ``CPU_SMS`` elsewhere (the interpreter)."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)


def _pow2_clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, v))))


def default_config(m: int, n: int, k: int, sm_count: int = H100_SMS) -> SkinnyConfig:
    """The heuristic config for an (M, N, K) problem on a GPU with ``sm_count`` SMs.

    1. block_m: M rounded up to a power of two in 16..64 (M = 64 is one tile; M = 256 four,
       which read each weight block together, the later ones from L2).
    2. Grid: aim at ``PROGRAMS_PER_SM * sm_count`` programs (264 on an H100) so that every SM
       streams weight. block_n 128 when N alone gives that many (LM head); else the widest of
       64, 32, 16, with block_k 128 before 64, that reaches it with split_k =
       cdiv(target, tiles), every split keeping >= 2 BLOCK_K tiles (split_k <= MAX_SPLIT_K);
       if none does, the one with the most programs. Wider N tiles mean fewer re-reads of x
       (from L2) and fewer fp32 partials than narrower tiles with more splits.
    3. Pipeline: when the grid needs r = cdiv(programs, SMs) <= MAX_RESIDENT programs per SM,
       they should all be resident at once (one wave: no SM idles at the end while others
       finish a last wave), so each program gets at most SMEM_PER_SM / r - 1 KiB of shared
       memory (and at most SMEM_BUDGET). Within it, the (block_k <= step 2's, num_stages in
       2..4) that keeps the most weight in flight, (num_stages - 1) * block_k; num_warps 4.

    On an H100 at M = 64: q/k/v (2048, 1536) -> n64 k64 split 9, 288 programs, 4 stages;
    o_proj (1536, 1536) -> n64 k64 split 11, 4 stages; down (1536, 8960) -> n64 k128 split
    11, 3 stages; gate/up (17920, 1536) -> n64 k64, no split (280 programs, 3 per SM), 4
    stages; LM head (151936, 1536) -> n128 k128, no split (9 waves), 3 stages.
    """
    block_m = _pow2_clamp(m, 16, 64)
    m_tiles = triton.cdiv(m, block_m)
    target = PROGRAMS_PER_SM * sm_count
    best = None  # (programs, block_n, block_k, split) with the most programs so far
    choice = None
    for block_n in (128, 64, 32, 16):
        tiles = m_tiles * triton.cdiv(n, block_n)
        if block_n == 128 and tiles < target:
            continue
        for block_k in (128, 64):
            block_k = _pow2_clamp(k, 16, block_k)
            k_tiles = triton.cdiv(k, block_k)
            split = max(1, min(triton.cdiv(target, tiles), MAX_SPLIT_K, k_tiles // 2))
            cand = (tiles * split, block_n, block_k, split)
            if best is None or cand[0] > best[0]:
                best = cand
            if cand[0] >= target:
                choice = cand
                break
        if choice is not None:
            break
    programs, block_n, block_k, split = choice or best

    per_sm = triton.cdiv(programs, sm_count)
    budget = SMEM_BUDGET
    if per_sm <= MAX_RESIDENT:
        budget = min(budget, SMEM_PER_SM // per_sm - 1024)
    pipelines = [
        ((stages - 1) * bk, bk, stages)
        for bk in (block_k, block_k // 2, block_k // 4)
        for stages in (4, 3, 2)
        if bk >= 16 and stages * (block_m + block_n) * bk * 2 <= budget
    ]
    _, block_k, stages = max(pipelines, default=(0, block_k, 2))
    return SkinnyConfig(
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        split_k=split,
        num_warps=4,
        num_stages=stages,
    )


def _check(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be (N, K), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must be (..., K = {k}), got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES or weight.dtype != x.dtype:
        raise TypeError(f"x and weight: one dtype of {DTYPES}, got {x.dtype}, {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x on {x.device}, weight on {weight.device}")
    if bias is not None and (bias.shape != (n,) or not bias.is_floating_point()):
        raise ValueError(f"bias must be float (N = {n},), got {tuple(bias.shape)} {bias.dtype}")
    if residual is not None:
        if residual.shape != (*x.shape[:-1], n):
            raise ValueError(
                f"residual must be {(*x.shape[:-1], n)}, got shape {tuple(residual.shape)}"
            )
        if residual.dtype != x.dtype:
            raise TypeError(f"residual dtype {residual.dtype} != x dtype {x.dtype}")


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` as (rows, width) with unit stride along width; a view where strides allow."""
    if t.stride(-1) != 1 and t.numel() > 0:
        t = t.contiguous()
    return t.reshape(-1, width)


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    config: SkinnyConfig | None = None,
) -> torch.Tensor:
    """``residual + F.linear(x, weight, bias)`` in one or two kernels; (..., N) in x's dtype.

    Shapes, dtypes and rounding in the module docstring. config: launch parameters, default
    ``default_config(M, N, K, SMs of x's device)``. weight must have unit stride along K
    (it is never copied); x and residual are copied only if their last dim is strided.
    """
    _check(x, weight, bias, residual)
    n, k = weight.shape
    if weight.stride(1) != 1 and n > 1:
        raise ValueError(f"weight must have unit stride along K, got strides {weight.stride()}")
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    x2 = _rows(x, k)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return out
    y2 = out.view(m, n)
    r2 = _rows(residual, n) if residual is not None else y2  # unused without a residual
    b = bias if bias is not None else y2  # unused without a bias
    if config is None:
        config = default_config(m, n, k, device_sm_count(x.device))
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    k_tiles = max(1, triton.cdiv(k, bk))
    splits = min(config.split_k, k_tiles)
    m_tiles = triton.cdiv(m, bm)
    n_tiles = triton.cdiv(n, bn)
    part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else y2
    flags = dict(HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None)
    _linear_tiles_kernel[(m_tiles * splits * n_tiles,)](
        x2, weight, b, r2, y2, part,
        m, n, k, x2.stride(0), weight.stride(0), r2.stride(0), y2.stride(0),
        k_tiles, splits, m_tiles,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=k % bk == 0, SPLIT=splits > 1,
        SWAP_AB=config.swap_ab, IEEE=x.dtype == torch.float32, **flags,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if splits > 1:
        sum_m, sum_n = SUM_TILE["cuda" if x.device.type == "cuda" else "other"]
        _sum_k_splits_kernel[(triton.cdiv(m, sum_m), triton.cdiv(n, sum_n))](
            part, b, r2, y2, m, n, r2.stride(0), y2.stride(0), splits,
            BLOCK_M=sum_m, BLOCK_N=sum_n, **flags, num_warps=4,
        )  # fmt: skip
    return out


def skinny_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch: fp32 x @ W^T + bias rounded to x's dtype, then + residual rounded again.

    The rounding ``skinny_linear`` does (``residual + F.linear(x, weight, bias)``), with the
    product computed in fp32 from the inputs' values. Shapes as ``skinny_linear``'s.
    """
    _check(x, weight, bias, residual)
    acc = x.float() @ weight.float().t()
    if bias is not None:
        acc = acc + bias.float()
    y = acc.to(x.dtype)
    if residual is not None:
        y = (y.float() + residual.float()).to(x.dtype)
    return y
