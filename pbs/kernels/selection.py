"""Triton kernel for step 2 of PBS-Attn: per query block, the kept key blocks as a list."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _select_blocks_kernel(
    LOGITS, SINK, COUNTS, IDX,
    n_kb, threshold,
    HQ: tl.constexpr, G: tl.constexpr, BLOCKS_PER_SEG: tl.constexpr, BLOCK_KB: tl.constexpr,
):  # fmt: skip
    """Smallest set of candidate key blocks whose pooled attention mass reaches ``threshold``.

    Grid: (n_qb, B*HQ). LOGITS: (B*HQ, n_qb, n_kb) fp32 pooled q.k scores (already scaled, in
    log2 units). Candidates of query block qb are the key blocks of earlier segments (the own
    segment is always computed exactly by the attention kernel). SINK: (B*HKV,) int32, the
    permuted block that holds token 0; kept whenever it is a candidate (a negative value
    disables it). Writes COUNTS: (B*HQ, n_qb) int32 and IDX: (B*HQ, n_qb, n_kb) int32 whose
    first COUNTS entries are the kept blocks in ascending order.

    The cut value is found by bisection on the float bit pattern (monotone for p >= 0), so the
    kept set is exactly the top-k blocks (ties included) without sorting the row.
    """
    qb = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_qb = tl.num_programs(0)
    row = pid_bh.to(tl.int64) * n_qb + qb
    offs = tl.arange(0, BLOCK_KB)
    n_cand = (qb // BLOCKS_PER_SEG) * BLOCKS_PER_SEG  # first block of the own segment
    cand = offs < n_cand
    s = tl.load(LOGITS + row * n_kb + offs, mask=cand, other=float("-inf"))
    m = tl.max(s, 0)
    m = tl.where(n_cand > 0, m, 0.0)
    p = tl.where(cand, tl.exp2(s - m), 0.0)
    target = threshold * tl.sum(p, 0)
    bits = p.to(tl.int32, bitcast=True)
    # Invariant: mass(bits >= lo) >= target, mass(bits >= hi) < target (hi = +inf bits).
    lo = tl.zeros([], tl.int32)
    hi = tl.full([], 0x7F800000, tl.int32)
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        ok = tl.sum(tl.where(bits >= mid, p, 0.0), 0) >= target
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    keep = cand & ((bits >= lo) | (threshold >= 1.0))
    sink = tl.load(SINK + pid_bh // G)
    keep = keep | (cand & (offs == sink))
    pos = tl.cumsum(keep.to(tl.int32), 0) - 1
    tl.store(IDX + row * n_kb + pos, offs, mask=keep)
    tl.store(COUNTS + row, tl.sum(keep.to(tl.int32), 0))


@triton.jit
def _mark_kept_kernel(
    COUNTS, IDX, KEPT, n_qb, n_kb,
    G: tl.constexpr, BLOCK_KB: tl.constexpr,
):  # fmt: skip
    """Mark each kept (query block, key block) pair in the transposed layout.

    Grid: (n_qb, B*HQ). COUNTS, IDX: as written by _select_blocks_kernel (only the first COUNTS
    entries of a row are read). KEPT: (B*HKV, n_kb, G*n_qb) int8, zeroed; receives 1 at
    [b*HKV + h // G, kb, (h % G) * n_qb + qb] for every kept key block kb of query block qb
    of query head h.
    """
    qb = tl.program_id(0)
    pid_bh = tl.program_id(1)
    row = pid_bh.to(tl.int64) * n_qb + qb
    count = tl.load(COUNTS + row)
    hkv_row = pid_bh // G
    col = (pid_bh % G) * n_qb + qb
    width = G * n_qb
    for start in range(0, count, BLOCK_KB):
        offs = start + tl.arange(0, BLOCK_KB)
        kb = tl.load(IDX + row * n_kb + offs, mask=offs < count, other=0)
        dst = (hkv_row.to(tl.int64) * n_kb + kb) * width + col
        tl.store(KEPT + dst, tl.full([BLOCK_KB], 1, tl.int8), mask=offs < count)


@triton.jit
def _compact_kept_kernel(KEPT, TCOUNTS, TIDX, width, CHUNK: tl.constexpr):
    """Per row of KEPT (B*HKV*n_kb rows of ``width`` = G*n_qb int8 flags), the positions of
    its ones in ascending order: TIDX (same shape, int32) gets them in its first TCOUNTS[row]
    entries (the rest is left as it was). Grid: (B*HKV*n_kb,)."""
    row = tl.program_id(0).to(tl.int64)
    n = tl.zeros([], tl.int32)
    for start in range(0, width, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        kept = tl.load(KEPT + row * width + offs, mask=offs < width, other=0).to(tl.int32)
        pos = n + tl.cumsum(kept, 0) - 1
        tl.store(TIDX + row * width + pos, offs, mask=kept > 0)
        n += tl.sum(kept, 0)
    tl.store(TCOUNTS + row, n)
