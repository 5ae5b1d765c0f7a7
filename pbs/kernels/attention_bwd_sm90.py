"""PBS-Attn's backward on Hopper (sm_90), written in Gluon: dq, dk and dv in one kernel.

The same computation as the portable kernels of :mod:`pbs.kernels.attention_bwd` (read their
docstring first), organised as FlashAttention-3 organises its backward:
- One program takes one work item (see pbs.kernels.work_items): a block of BLOCK = 128
  permuted keys of one (batch, KV head) over one region of query blocks. It holds the keys in
  shared memory and their dk, dv accumulators in registers, 64 keys (one wgmma M) per consumer
  warpgroup, and adds them into fp32 dk, dv buffers at the end: a key block's items add up
  there in no fixed order, so dk and dv are not bitwise reproducible (dq never was).
- Items run in region order, so the key blocks that share a region's Q, dO and dq tiles run
  side by side while the tiles are in L2. Run by key block instead (one program walking all
  its query blocks), the kernel was bound by DRAM traffic: at 128K on an H100, 55% L2 hit
  rate, 403 GB moved, the dq reduce-adds a fifth of its time. Run by items: 97% L2 hit rate,
  32 GB moved, but only 5% less time; the tensor cores idle half of it while the consumers
  wait, a third of their stall samples on instruction fetch (bench/results/pbs_backward.md):
  hence the walk in loops, not unrolled, and the overlap of tiles below.
- Two producer warps, one for Q and its lse, one for dO and its delta, stream the item's query
  tiles by TMA into rings of ``STAGES`` slots ("ready" and "empty" mbarriers per slot): (a)
  the region's query blocks that kept this key block (the transposed block lists), each in
  tiles of 64 queries, then, in one item per key block, (b) every query head of the group
  over its own segment, from the tile's earliest key on, masked token by token. Both
  consumers read the same tiles.
- Per tile a consumer issues S^T = K Q^T and dP^T = V dO^T together (async wgmma), turns S^T
  into P^T while dP^T runs, forms dS^T = P^T (dP^T - delta), issues dV += P^T dO (P^T from
  registers), puts dS^T in shared memory and issues dK += dS^T Q from there. The query stats
  (lse, delta) arrive with the tile in shared memory and are read while the wgmmas run, then
  applied by FMA (P^T = exp2(S^T * scale - lse), dS^T = P^T (dP^T - delta)): loaded from global
  memory by the consumer they put a load's latency before every tile, held in registers they
  spilled, and starting the wgmma accumulators they cost ~100 instructions a tile.
- Every loop-invariant shared-memory address is formed inside the loop (see ``zero`` in
  _consumer): hoisted, ptxas spilled them.
- dq: once both consumers' dS^T are in shared memory (one mbarrier per buffer, two buffers),
  consumer p computes dQ[:, half p of the head dim] = dS K[:, half p] over all 128 keys. A
  tile's dK and dQ wgmmas run on into the next tile, which issues its S^T behind them before
  awaiting all three, so the tensor cores do not drain between tiles; the dq half is then
  staged in shared memory, and a third worker warp adds the tile into an fp32 dq buffer
  by TMA reduce-add. dq so gathers the contributions of every key block that sees its queries
  in the same pass (the portable backward runs a second kernel that recomputes S and dP for
  dq). dS is rounded to 16 bits before the softmax scale, as in the portable kernels; dq and
  dk are scaled in fp32.

Measured (bench/results/pbs_backward.md, 25% density, 32 query / 8 KV heads, H100, kernel
alone, one call): 159.0-159.1 ms at 128K and 11.3-11.5 ms at 32K, against 194.9-195.0 and
12.9-13.2 ms for the kernel before it (the walk unrolled over heads and tiles, stats starting
the accumulators, no overlap) and 166.2-166.4 and 12.0-12.4 ms without the overlap. At 128K
dq is within 2.9e-4 (relative norm) and dk, dv within 1.3e-4 of the loop-walk kernel's, itself
within 2.3e-5 of the earlier kernel's. Putting both consumer warpgroups in one 8-warp
partition (one copy of the tile code) was slower: 172.5 ms at 128K.
"""

from __future__ import annotations

import torch
import triton
from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .attention_sm90 import LOG2E, ROWS, _exp2, _rows

# Triton 3.7 renamed the TMA load (async_copy_global_to_shared -> async_load): same builtin.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

# Slots in each of the Q and dO rings (16 KB each at 64 x 128 bf16). Two beat three in an
# earlier kernel (201 vs 233 ms at 128K on an H100) and tie in this one's one-partition
# variants (167.5 vs 166.5 ms; bench/results/pbs_backward.md), with 33 KB less shared memory.
STAGES = 2
# Registers per thread of the second consumer warpgroup (dk and dv take 128 of them); the
# three one-warp workers keep 24 each. At 240 ptxas keeps both consumers' tile loops free of
# local memory; at 232 the first consumer's stores 3 and loads 3 values a tile (offline sm_90
# build, Triton 3.6, 4 query heads per KV head).
CONSUMER_REGS = 240


@builtin
def _tma_reduce_add(desc, coord, src, _semantic=None):
    """Add the shared-memory tile ``src`` into the tile of ``desc`` at ``coord`` (TMA
    reduce-add, cp.reduce.async.bulk.tensor). Triton 3.6 builds the op but Gluon has no
    wrapper for it; completion is awaited like a TMA store's (tma.store_wait)."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(
        ir.DESCRIPTOR_REDUCE_KIND.ADD, desc.handle, coord, src.handle
    )


@gluon.jit
def _walk(visit: gl.constexpr, acc, ctx, tidx_ptr, item, bh0, first, seg_end, N, n_qb,
          G: gl.constexpr, BLOCK: gl.constexpr):  # fmt: skip
    """acc = visit(t, bh, m0, masked, acc, ctx) for the item's query tiles t = 0, 1, ... in
    order: queries [m0, m0 + 64) of query row bh = batch * HQ + head (bh0: the group's first),
    masked for the own segment. item points at the item's row of ITEMS (see pbs.kernels.work_items).
    Every partition walks the same schedule. Returns acc and the number of tiles."""
    SUB: gl.constexpr = BLOCK // ROWS
    t = 0
    # (a) the region's query blocks that kept this key block, head g, SUB tiles each. Loops, not
    # unrolled: a consumer's tile is ~500 instructions, and unrolled over heads and tiles a third
    # of the consumers' stall samples waited for instruction fetch (ncu at 128K on an H100).
    for g in range(G):
        for e in range(gl.load(item + 2 + g) * SUB, gl.load(item + 2 + G + g) * SUB):
            m0 = (gl.load(tidx_ptr + e // SUB) % n_qb) * BLOCK + (e % SUB) * ROWS
            acc = visit(t, bh0 + g, m0, False, acc, ctx)
            t += 1
    for g in range(gl.load(item + 1) * G):  # (b) own segment (one item per key block has it)
        for m0 in range(first, seg_end, ROWS):
            acc = visit(t, bh0 + g, m0, True, acc, ctx)
            t += 1
    return acc, t


@gluon.jit
def _load_tile(t, bh, m0, masked: gl.constexpr, acc, ctx):
    """Producer step: start the TMA loads of tile t (its rows of desc and its 64 stats) into
    the rings' slot once both consumers have released the slot's previous tile. ctx: (desc,
    ring, ready, empty, N, stat_desc, stat_ring, NPAD)."""
    desc, ring, ready, empty, N, stat_desc, stat_ring, NPAD = ctx
    STAGES: gl.constexpr = ring.shape[0]
    slot = t % STAGES
    if t >= STAGES:
        mbarrier.wait(empty.index(slot), (t // STAGES - 1) & 1)
    mbarrier.expect(ready.index(slot), desc.block_type.nbytes + stat_desc.block_type.nbytes)
    _tma_load(desc, [bh * N + m0, 0], ready.index(slot), ring.index(slot))
    _tma_load(stat_desc, [bh * NPAD + m0], ready.index(slot), stat_ring.index(slot))
    return acc


@gluon.jit
def _producer(desc, ring, stat_desc, stat_ring, ready, empty, tidx_ptr, item, bh0, first,
              seg_end, N, NPAD, n_qb, G: gl.constexpr, BLOCK: gl.constexpr):  # fmt: skip
    """One warp: loads the schedule's query tiles of Q and their lse (or dO and their delta)
    into the rings."""
    ctx = (desc, ring, ready, empty, N, stat_desc, stat_ring, NPAD)
    _walk(_load_tile, first, ctx, tidx_ptr, item, bh0, first, seg_end, N, n_qb, G, BLOCK)


@gluon.jit
def _add_dq(t, bh, m0, masked: gl.constexpr, acc, ctx):
    """dq-writer step: once both consumers staged tile t's dq halves, add them into the fp32
    dq buffer and free the staging buffer. ctx: (dq_desc, dq_smem, ready, empty, N)."""
    dq_desc, dq_smem, ready, empty, N = ctx
    HALF: gl.constexpr = dq_desc.block_type.shape[1]
    mbarrier.wait(ready, t & 1)
    _tma_reduce_add(dq_desc, [bh * N + m0, 0], dq_smem.index(0))
    _tma_reduce_add(dq_desc, [bh * N + m0, HALF], dq_smem.index(1))
    tma.store_wait(0)
    mbarrier.arrive(empty, count=1)
    return acc


@gluon.jit
def _dq_writer(dq_desc, dq_smem, dq_ready, dq_empty, tidx_ptr, item, bh0, first, seg_end, N,
               n_qb, G: gl.constexpr, BLOCK: gl.constexpr):  # fmt: skip
    """One warp: adds every tile's dq into the fp32 dq buffer (rows of a tile past N belong to
    the next head and receive exact zeros: their probabilities are 0)."""
    _walk(_add_dq, first, (dq_desc, dq_smem, dq_ready, dq_empty, N), tidx_ptr, item, bh0, first,
          seg_end, N, n_qb, G, BLOCK)  # fmt: skip


# _walk's visit for each consumer: ``part`` must stay a constexpr (it slices shared memory), and
# a constexpr passed through ctx becomes a tensor.
@gluon.jit
def _tile0(t, bh, m0, masked: gl.constexpr, acc, ctx):
    return _tile(0, t, bh, m0, masked, acc, ctx)


@gluon.jit
def _tile1(t, bh, m0, masked: gl.constexpr, acc, ctx):
    return _tile(1, t, bh, m0, masked, acc, ctx)


@gluon.jit
def _tile(part: gl.constexpr, t, bh, m0, masked: gl.constexpr, acc, ctx):
    """Consumer step: fold query tile t (queries [m0, m0 + 64) of query row bh) into this
    warpgroup's acc = (dk, dv, dq) (its 64 keys; dq: the previous tile's dq half), whose dk and
    dq are still being computed by wgmma: they are awaited with this tile's S^T, dq scaled and
    staged, and this tile's dK and dQ are returned running; ctx: what it reads (see
    _consumer). With ``masked`` a query sees a key only at or after it. Queries past N have lse
    = inf in the stats ring, so P^T and dS^T are exactly 0 there."""
    dk, dv, dq_prev = acc
    (key_pos, k_pair, v_pair, zero, q_ring, do_ring, lse_ring, delta_ring, q_ready, do_ready,
     slot_free, ds_smem, ds_bar, dq_pair, dq_ready, dq_empty, qk_scale, sm_scale) = ctx  # fmt: skip
    dtype: gl.constexpr = q_ring.dtype
    STAGES: gl.constexpr = q_ring.shape[0]
    HEAD_DIM: gl.constexpr = q_ring.shape[2]
    HALF: gl.constexpr = dq_pair.shape[2]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, ROWS, 16]
    )
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF, 16]
    )
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    offs_m = m0 + gl.arange(0, ROWS, layout=gl.SliceLayout(0, s_layout))
    zeros = gl.zeros([ROWS, ROWS], gl.float32, s_layout)
    slot = t % STAGES
    phase = (t // STAGES) & 1
    z = t * zero  # 0, formed per tile (see _consumer)
    k_own = k_pair.index(part + z)
    v_smem = v_pair.index(part + z)
    k_half0 = k_pair.index(z).slice(part * HALF, HALF, dim=1)
    k_half1 = k_pair.index(z + 1).slice(part * HALF, HALF, dim=1)
    q = q_ring.index(slot + z)
    do = do_ring.index(slot + z)
    mbarrier.wait(q_ready.index(slot), phase)
    s_tok = warpgroup_mma(k_own, q.permute((1, 0)), zeros, use_acc=False, is_async=True)
    # The previous tile's dK and dQ ran on while this one's S^T was issued behind them. (With
    # a partial wait here, retiring them but not S^T, ptxas serialised every wgmma.)
    dk, dq_prev, s = warpgroup_mma_wait(0, deps=(dk, dq_prev, s_tok))
    if t > 0:
        mbarrier.arrive(slot_free.index((t - 1) % STAGES), count=1)
        _stage_dq(t - 1, dq_prev * sm_scale, dq_pair.index(part + z), dq_ready, dq_empty)
    mbarrier.wait(do_ready.index(slot), phase)
    dp_tok = warpgroup_mma(v_smem, do.permute((1, 0)), zeros, use_acc=False, is_async=True)
    lse = lse_ring.index(slot).load(gl.SliceLayout(0, s_layout))
    p = _exp2(s * qk_scale - lse[None, :])
    if masked:
        p = gl.where(offs_m[None, :] >= key_pos[:, None], p, 0.0)
    delta = delta_ring.index(slot).load(gl.SliceLayout(0, s_layout))
    dp = warpgroup_mma_wait(0, deps=(dp_tok,))
    ds = (p * (dp - delta[None, :])).to(dtype)
    p_op = gl.convert_layout(p.to(dtype), op_layout)
    dv_tok = warpgroup_mma(p_op, do, dv, is_async=True)
    buf = t % 2
    ds_tile = ds_smem.index(buf * 2 + part)
    ds_tile.store(ds)
    fence_async_shared()
    dk_tok = warpgroup_mma(ds_tile, q, dk, is_async=True)
    mbarrier.arrive(ds_bar.index(buf), count=1)
    mbarrier.wait(ds_bar.index(buf), (t // 2) & 1)
    dq_zero = gl.zeros([ROWS, HALF], gl.float32, dq_layout)
    # dQ_p = dS K[:, half p], summed over the two consumers' 64 keys
    dq_tok = warpgroup_mma(ds_smem.index(buf * 2).permute((1, 0)), k_half0, dq_zero,
                           use_acc=False, is_async=True)  # fmt: skip
    dq_tok = warpgroup_mma(ds_smem.index(buf * 2 + 1).permute((1, 0)), k_half1, dq_tok,
                           is_async=True)  # fmt: skip
    # dK and dQ (three wgmma groups: dK's, dQ's two) are left running: the next tile issues its
    # S^T behind them.
    dv, p_op = warpgroup_mma_wait(3, deps=(dv_tok, p_op))
    return dk_tok, dv, dq_tok


@gluon.jit
def _stage_dq(t, dq, dq_own, dq_ready, dq_empty):
    """Put tile t's dq half in shared memory for the writer, once it has sent tile t-1's."""
    mbarrier.wait(dq_empty, (t & 1) ^ 1)
    dq_own.store(dq)
    fence_async_shared()
    mbarrier.arrive(dq_ready, count=1)


@gluon.jit
def _consumer(part: gl.constexpr, k_smem, v_pair, kv_bar, kp_desc, vp_desc, q_ring, do_ring,
              q_ready, do_ready, slot_free, ds_smem, ds_bar, dq_smem, dq_ready,
              dq_empty, lse_ring, delta_ring, PERM, DK, DV, spn, sgn, tidx_ptr, item, bh0,
              first, seg_end, kv_row0, start_n, N, n_qb, qk_scale, sm_scale, G: gl.constexpr,
              HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr):  # fmt: skip
    """One warpgroup: dk, dv of permuted keys [start_n + part * 64, +64) over the whole
    schedule, stored at the keys' original positions, and its half of every tile's dq. PERM,
    DK, DV point at this (batch, KV head); kv_row0: its first row in the permuted K/V
    descriptors; k_smem, v_pair: both consumers' keys and values, 64 rows each."""
    dtype: gl.constexpr = k_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, ROWS, 16]
    )
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    n0 = start_n + part * ROWS
    k_own = k_smem.index(part)
    v_smem = v_pair.index(part)
    mbarrier.expect(kv_bar.index(part), 2 * kp_desc.block_type.nbytes)
    _tma_load(kp_desc, [kv_row0 + n0, 0], kv_bar.index(part), k_own)
    _tma_load(vp_desc, [kv_row0 + n0, 0], kv_bar.index(part), v_smem)
    keys = n0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
    # Rows past N get position N: their dk, dv are not stored.
    key_pos = gl.load(PERM + keys.to(gl.int64) * spn, mask=keys < N, other=N)
    dk = gl.zeros([ROWS, HEAD_DIM], gl.float32, acc_layout)
    dv = gl.zeros([ROWS, HEAD_DIM], gl.float32, acc_layout)
    mbarrier.wait(kv_bar.index(part), 0)
    if n0 + ROWS > N:
        # Rows past N hold whatever follows the sequence (kp, vp may be views of longer
        # buffers, NaN included). Zeroed, they add exact zeros to dq, whose product reads
        # every key of the block; the other consumer reads them after the first dS^T barrier.
        rows_ok = (n0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, out_layout)) < N)[:, None]
        zero_rows = gl.zeros([ROWS, HEAD_DIM], dtype, out_layout)
        k_own.store(gl.where(rows_ok, k_own.load(out_layout), zero_rows))
        v_smem.store(gl.where(rows_ok, v_smem.load(out_layout), zero_rows))
        fence_async_shared()
    mbarrier.wait(kv_bar.index(1 - part), 0)  # the other consumer's keys, for dq

    # A zero that ptxas cannot see is one (the grid is 1-D). _tile indexes the K, V, Q, dO and
    # dq buffers with t * zero, so their wgmma descriptors and addresses are formed per tile
    # instead of hoisted out of the loop and spilled.
    zero = gl.program_id(2)
    ctx = (key_pos, k_smem, v_pair, zero, q_ring, do_ring, lse_ring, delta_ring, q_ready,
           do_ready, slot_free, ds_smem, ds_bar, dq_smem, dq_ready, dq_empty,
           qk_scale, sm_scale)  # fmt: skip
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM // 2, 16]
    )
    acc = (dk, dv, gl.zeros([ROWS, HEAD_DIM // 2], gl.float32, dq_layout))
    if part == 0:
        acc, n_tiles = _walk(_tile0, acc, ctx, tidx_ptr, item, bh0, first, seg_end, N, n_qb, G,
                             BLOCK)  # fmt: skip
    else:
        acc, n_tiles = _walk(_tile1, acc, ctx, tidx_ptr, item, bh0, first, seg_end, N, n_qb, G,
                             BLOCK)  # fmt: skip
    dk, dv, dq = acc
    dk, dq = warpgroup_mma_wait(0, deps=(dk, dq))
    _stage_dq(n_tiles - 1, dq * sm_scale, dq_smem.index(part), dq_ready, dq_empty)

    # Added from the wgmma layout into the fp32 dk, dv buffers (other items of the same key
    # block add theirs), once an item: not worth a layout conversion through shared memory.
    pos = gl.convert_layout(key_pos, gl.SliceLayout(1, acc_layout))
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
    dst = pos[:, None].to(gl.int64) * sgn + dims[None, :]
    ok = (pos < N)[:, None]
    gl.atomic_add(DK + dst, dk * sm_scale, mask=ok, sem="relaxed")
    gl.atomic_add(DV + dst, dv, mask=ok, sem="relaxed")


@gluon.jit
def _attn_bwd_sm90(
    q_desc, do_desc, kp_desc, vp_desc, dq_desc, lse_desc, delta_desc, PERM, TIDX, ITEMS,
    DK, DV, spb, sph, spn, sgb, sgh, sgn, N, NP, NPAD, n_qb, n_kb, qk_scale, sm_scale,
    HQ: gl.constexpr, G: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr,
    SEG: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
):  # fmt: skip
    """One work item: the contributions of BLOCK permuted key rows of one (batch, KV head) and
    one region of query blocks to dk, dv (added in original key order into fp32 buffers) and
    to dq (added into the fp32 dq buffer).

    q_desc, do_desc: TMA descriptors of Q and dO as (B*HQ*N, HEAD_DIM), block (64, HEAD_DIM);
    kp_desc, vp_desc: permuted K, V as (B*HKV*NP, HEAD_DIM) (NP >= N rows per head), block
    (64, HEAD_DIM); dq_desc: the fp32 dq buffer as (B*HQ*N, HEAD_DIM), zeroed, block (64,
    HEAD_DIM / 2); it receives dq = scale * sum_j dS_ij k_j. lse_desc, delta_desc: the
    per-query stats as (B*HQ*NPAD,) fp32 (each query row padded to NPAD, a multiple of BLOCK,
    with lse = inf, delta = 0), block 64. PERM (strides spb, sph, spn), TIDX: as in
    ``_attn_bwd_dkdv``; ITEMS: the rows of pbs.kernels.work_items. DK, DV: (B, HKV, N,
    HEAD_DIM) fp32, zeroed, with strides sgb, sgh, sgn. qk_scale: softmax scale times log2(e);
    sm_scale: the softmax scale. BLOCK = 2 * 64: two consumer warpgroups. Grid: (n_items,);
    launched with 4 warps (consumer 0).
    """
    dtype: gl.constexpr = q_desc.dtype
    HKV: gl.constexpr = HQ // G
    HALF: gl.constexpr = HEAD_DIM // 2
    item = ITEMS + gl.program_id(0) * (2 + 2 * G)
    trow = gl.load(item)  # key block pid_n of (batch, KV head) pid_bh: pid_bh * n_kb + pid_n
    pid_n = trow % n_kb
    pid_bh = trow // n_kb
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    start_n = pid_n * BLOCK

    q_ring = gl.allocate_shared_memory(dtype, [STAGES, ROWS, HEAD_DIM], q_desc.layout)
    do_ring = gl.allocate_shared_memory(dtype, [STAGES, ROWS, HEAD_DIM], do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], kp_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], vp_desc.layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, ROWS], dtype)
    ds_smem = gl.allocate_shared_memory(dtype, [4, ROWS, ROWS], ds_layout)
    dq_smem = gl.allocate_shared_memory(gl.float32, [2, ROWS, HALF], dq_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ds_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    dq_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    lse_ring = gl.allocate_shared_memory(gl.float32, [STAGES, ROWS], lse_desc.layout)
    delta_ring = gl.allocate_shared_memory(gl.float32, [STAGES, ROWS], delta_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    # A slot of both rings is free once both consumers are done with its Q and dO tiles.
    slot_free = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(kv_bar.index(i), count=1)
        mbarrier.init(ds_bar.index(i), count=2)
    mbarrier.init(dq_bar.index(0), count=2)  # ready: both halves staged
    mbarrier.init(dq_bar.index(1), count=1)  # empty: the writer has sent them
    for i in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(do_ready.index(i), count=1)
        mbarrier.init(slot_free.index(i), count=2)

    tidx_ptr = TIDX + trow.to(gl.int64) * (G * n_qb)
    perm = PERM + b.to(gl.int64) * spb + hkv.to(gl.int64) * sph
    # (b) starts at the 64-query tile holding the block's earliest key, ends with the segment.
    pos_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    keys = start_n + gl.arange(0, BLOCK, layout=pos_layout)
    seg0 = (start_n // SEG) * SEG
    first = gl.min(gl.load(perm + keys.to(gl.int64) * spn, mask=keys < N, other=N), 0)
    first = seg0 + ((first - seg0) // ROWS) * ROWS
    seg_end = gl.minimum(seg0 + SEG, N)
    bh0 = b * HQ + hkv * G
    kv_row0 = pid_bh * NP
    dk_ptr = DK + b.to(gl.int64) * sgb + hkv.to(gl.int64) * sgh
    dv_ptr = DV + b.to(gl.int64) * sgb + hkv.to(gl.int64) * sgh

    gl.warp_specialize(
        [
            (_consumer, (0, k_smem, v_smem, kv_bar, kp_desc, vp_desc, q_ring, do_ring,
                         q_ready, do_ready, slot_free, ds_smem, ds_bar, dq_smem,
                         dq_bar.index(0), dq_bar.index(1), lse_ring, delta_ring, perm, dk_ptr,
                         dv_ptr, spn, sgn, tidx_ptr, item, bh0, first, seg_end, kv_row0,
                         start_n, N, n_qb, qk_scale, sm_scale, G, HEAD_DIM, BLOCK)),
            (_consumer, (1, k_smem, v_smem, kv_bar, kp_desc, vp_desc, q_ring, do_ring,
                         q_ready, do_ready, slot_free, ds_smem, ds_bar, dq_smem,
                         dq_bar.index(0), dq_bar.index(1), lse_ring, delta_ring, perm, dk_ptr,
                         dv_ptr, spn, sgn, tidx_ptr, item, bh0, first, seg_end, kv_row0,
                         start_n, N, n_qb, qk_scale, sm_scale, G, HEAD_DIM, BLOCK)),
            (_producer, (q_desc, q_ring, lse_desc, lse_ring, q_ready, slot_free, tidx_ptr,
                         item, bh0, first, seg_end, N, NPAD, n_qb, G, BLOCK)),
            (_producer, (do_desc, do_ring, delta_desc, delta_ring, do_ready, slot_free, tidx_ptr,
                         item, bh0, first, seg_end, N, NPAD, n_qb, G, BLOCK)),
            (_dq_writer, (dq_desc, dq_smem, dq_bar.index(0), dq_bar.index(1), tidx_ptr, item,
                          bh0, first, seg_end, N, n_qb, G, BLOCK)),
        ],
        [4, 1, 1, 1],
        [CONSUMER_REGS, 24, 24, 24],
    )  # fmt: skip


def block_sparse_backward_sm90(
    q: torch.Tensor,
    do: torch.Tensor,
    kp: torch.Tensor,
    vp: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    perm: torch.Tensor,
    tidx: torch.Tensor,
    items: torch.Tensor,
    n_qb: int,
    block: int,
    seg: int,
    scale: float,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> None:
    """Fill dq (B, HQ, N, D) and add into the zeroed fp32 dk, dv (B, HKV, N, D) as the portable
    ``_attn_bwd_dq`` and ``_attn_bwd_dkdv`` do (same arguments, as tensors; items from
    :func:`work_items`).

    q, do: (B, HQ, N, D), copied when their rows are not laid out (B*HQ*N, D); kp, vp may be
    views of longer buffers (one row spacing for both); lse, delta: contiguous (B, HQ, N) fp32.
    dq goes through an fp32 buffer of B*HQ*N*D values (the TMA reduce-adds' target).
    """
    B, HQ, N, D = q.shape
    HKV = kp.shape[1]
    kp2, vp2 = _rows(kp, longer=True), _rows(vp, longer=True)
    assert kp2.shape == vp2.shape, "kp and vp must space their heads alike"
    dt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([ROWS.value, D], dt)
    q_desc, do_desc, kp_desc, vp_desc = (
        TensorDescriptor.from_tensor(t, [ROWS.value, D], layout)
        for t in (_rows(q), _rows(do), kp2, vp2)
    )
    dq_acc = torch.zeros(B * HQ * N, D, device=q.device, dtype=torch.float32)
    npad = triton.cdiv(N, block) * block
    stats = torch.empty(2, B * HQ, npad, device=q.device, dtype=torch.float32)
    stats[0, :, N:], stats[1, :, N:] = float("inf"), 0.0  # queries past N: P = 0
    stats[0, :, :N], stats[1, :, :N] = lse.view(B * HQ, N), delta.view(B * HQ, N)
    stat_layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)
    lse_desc, delta_desc = (
        TensorDescriptor.from_tensor(x.view(-1), [ROWS.value], stat_layout) for x in stats
    )
    dq_layout = gl.NVMMASharedLayout.get_default_for([ROWS.value, D // 2], gl.float32)
    dq_desc = TensorDescriptor.from_tensor(dq_acc, [ROWS.value, D // 2], dq_layout)
    _attn_bwd_sm90[(items.shape[0],)](
        q_desc, do_desc, kp_desc, vp_desc, dq_desc, lse_desc, delta_desc, perm, tidx, items,
        dk, dv, *perm.stride(), *dk.stride()[:3], N, kp2.shape[0] // (B * HKV),
        npad, n_qb, tidx.shape[2], scale * LOG2E, scale,
        HQ=HQ, G=HQ // HKV, HEAD_DIM=D, BLOCK=block, SEG=seg, STAGES=STAGES,
        CONSUMER_REGS=CONSUMER_REGS, num_warps=4,
    )  # fmt: skip
    dq.copy_(dq_acc.view(B, HQ, N, D))
