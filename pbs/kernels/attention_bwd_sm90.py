"""The dk, dv half of PBS-Attn's backward on Hopper (sm_90), written in Gluon.

The same computation as ``_attn_bwd_dkdv`` in :mod:`pbs.kernels.attention_bwd` (the portable
kernel; read its docstring first), organised as FlashAttention-3 organises its backward:
- One program holds one block of BLOCK permuted keys of one (batch, KV head) in shared memory
  and their dk, dv accumulators in registers, 64 keys (one wgmma M) per consumer warpgroup.
- Two producer warps, one for Q and its lse, one for dO and its delta, stream the query tiles
  of the schedule by TMA into rings of ``STAGES`` slots ("ready" and "empty" mbarriers per
  slot): (a) the query
  blocks that kept this key block (the transposed block lists), each in tiles of 64 queries,
  then (b) every query head of the group over its own segment, from the tile's earliest key
  on, masked token by token. Both consumers read the same tiles.
- Per tile a consumer issues S^T = K Q^T and dP^T = V dO^T together (async wgmma), turns S^T
  into P^T while dP^T runs, issues dV += P^T dO, forms dS^T = P^T (dP^T - delta) while dV
  runs, then dK += dS^T Q. P^T and dS^T stay in registers as the A operand of the next
  products: no shared-memory round trip. The query stats (lse, delta) arrive with the tile in
  shared memory and start the S^T and dP^T accumulators: loaded from global memory by the
  consumer they put a load's latency before every tile, and held in registers they spilled.
- Every loop-invariant shared-memory address is formed inside the loop (see ``zero`` in
  _consumer): hoisted, ptxas spilled them.
dq stays with the portable dq kernel (one program per query tile, no atomics).

Measured on an H100 (bench/results/pbs_backward.md): 8.69 ms at 32K and 116.8 ms at 128K, against
12.53 and 159.1 ms for the portable kernel's best tile (another call, same inputs); same dk, dv
up to fp32 rounding (relative difference <= 7.4e-4). Three ring slots instead of two: 22% faster
at 128K (the consumers' hot loops spill almost nothing; 205 spill stores in the SASS with two).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .attention_sm90 import LOG2E, ROWS, _exp2, _rows

# Triton 3.7 renamed the TMA load (async_copy_global_to_shared -> async_load): same builtin.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

STAGES = 3  # slots in each of the Q and dO rings (3 x 2 x 16 KB at 64 x 128 bf16)
# Registers per thread of the second consumer warpgroup (dk and dv take 128 of them); the
# producers keep 24 each.
CONSUMER_REGS = 240


@gluon.jit
def _put(t, bh, m0, desc, ring, stat_desc, stat_ring, ready, empty, N, NPAD,
         STAGES: gl.constexpr):  # fmt: skip
    """Start the TMA loads of tile t (queries [m0, m0 + 64) of query row bh: their rows of
    desc and their stats) into its ring slots, once both consumers have released the slots'
    previous tile; returns t + 1."""
    slot = t % STAGES
    if t >= STAGES:
        mbarrier.wait(empty.index(slot), (t // STAGES - 1) & 1)
    mbarrier.expect(ready.index(slot), desc.block_type.nbytes + stat_desc.block_type.nbytes)
    _tma_load(desc, [bh * N + m0, 0], ready.index(slot), ring.index(slot))
    _tma_load(stat_desc, [bh * NPAD + m0], ready.index(slot), stat_ring.index(slot))
    return t + 1


@gluon.jit
def _producer(desc, ring, stat_desc, stat_ring, ready, empty, tidx_ptr, count, bh0, first,
              seg_end, N, NPAD, n_qb, G: gl.constexpr, BLOCK: gl.constexpr,
              STAGES: gl.constexpr):  # fmt: skip
    """One warp: loads the schedule's query tiles of Q and their lse (or dO and their delta)
    into the rings. bh0: the (batch * HQ + head) of the group's first query head."""
    t = 0
    for e in range(count):
        entry = gl.load(tidx_ptr + e)
        bh = bh0 + entry // n_qb
        m0 = (entry % n_qb) * BLOCK
        for sub in gl.static_range(BLOCK // ROWS):
            t = _put(t, bh, m0 + sub * ROWS, desc, ring, stat_desc, stat_ring, ready, empty, N,
                     NPAD, STAGES)  # fmt: skip
    for g in range(G):
        for m0 in range(first, seg_end, ROWS):
            t = _put(t, bh0 + g, m0, desc, ring, stat_desc, stat_ring, ready, empty, N, NPAD,
                     STAGES)  # fmt: skip


@gluon.jit
def _tile(dk, dv, t, k_pair, v_pair, part, zero, q_ring, do_ring, q_ready, do_ready, q_empty,
          do_empty, lse_ring, delta_ring, m0, key_pos, qk_scale,
          MASKED: gl.constexpr, STAGES: gl.constexpr, HEAD_DIM: gl.constexpr):  # fmt: skip
    """Fold query tile t (queries [m0, m0 + 64) of query row bh = batch * HQ + head) into this
    warpgroup's dk, dv (64 keys). key_pos: the keys' original positions; with MASKED a query
    sees a key only at or after it. The tile's lse and delta come in their rings with Q and dO;
    queries past N have lse = inf there, so P^T is exactly 0 for them.
    """
    dtype: gl.constexpr = q_ring.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, ROWS, 16]
    )
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    offs_m = m0 + gl.arange(0, ROWS, layout=gl.SliceLayout(0, s_layout))
    zeros = gl.zeros([ROWS, ROWS], gl.float32, s_layout)

    slot = t % STAGES
    phase = (t // STAGES) & 1
    k_smem = k_pair.index(part + t * zero)  # formed per tile: see _consumer
    v_smem = v_pair.index(part + t * zero)
    q = q_ring.index(slot)
    do = do_ring.index(slot)
    mbarrier.wait(q_ready.index(slot), phase)
    lse = lse_ring.index(slot).load(gl.SliceLayout(0, s_layout))
    s_init = zeros - (lse * (1.0 / qk_scale))[None, :]
    s_tok = warpgroup_mma(k_smem, q.permute((1, 0)), s_init, is_async=True)
    mbarrier.wait(do_ready.index(slot), phase)
    delta = delta_ring.index(slot).load(gl.SliceLayout(0, s_layout))
    dp_init = zeros - delta[None, :]
    dp_tok = warpgroup_mma(v_smem, do.permute((1, 0)), dp_init, is_async=True)
    # wgmma groups retire in order: one outstanding means S^T is done, dP^T may run on.
    s = warpgroup_mma_wait(1, deps=(s_tok,))
    p = _exp2(s * qk_scale)
    if MASKED:
        p = gl.where(offs_m[None, :] >= key_pos[:, None], p, 0.0)
    p_op = gl.convert_layout(p.to(dtype), op_layout)
    dv_tok = warpgroup_mma(p_op, do, dv, is_async=True)
    dp = warpgroup_mma_wait(1, deps=(dp_tok,))
    ds_op = gl.convert_layout((p * dp).to(dtype), op_layout)
    dk_tok = warpgroup_mma(ds_op, q, dk, is_async=True)
    dv, dk, p_op, ds_op = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok, p_op, ds_op))
    mbarrier.arrive(q_empty.index(slot), count=1)
    mbarrier.arrive(do_empty.index(slot), count=1)
    return dk, dv


@gluon.jit
def _consumer(part: gl.constexpr, k_pair, v_pair, kv_bar, kp_desc, vp_desc, q_ring, do_ring,
              q_ready, do_ready, q_empty, do_empty, lse_ring, delta_ring, PERM, DK, DV, spn,
              sgn, count, first, seg_end, kv_row0, start_n, N, qk_scale, sm_scale,
              G: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr,
              STAGES: gl.constexpr):  # fmt: skip
    """One warpgroup: dk, dv of permuted keys [start_n + part * 64, +64) over the whole
    schedule, stored at the keys' original positions. PERM, DK, DV point at this (batch, KV
    head); kv_row0: its first row in the permuted K/V descriptors."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, ROWS, 16]
    )
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    n0 = start_n + part * ROWS
    k_smem = k_pair.index(part)
    v_smem = v_pair.index(part)
    # A zero that ptxas cannot see is one (the grid is 2-D). _tile indexes K's and V's shared
    # memory with t * zero, so their 16 wgmma descriptors are formed per tile instead of
    # hoisted out of the loop and spilled: 51 spill stores in the SASS without it, 1 with it.
    zero = gl.program_id(2)
    mbarrier.expect(kv_bar, 2 * kp_desc.block_type.nbytes)
    _tma_load(kp_desc, [kv_row0 + n0, 0], kv_bar, k_smem)
    _tma_load(vp_desc, [kv_row0 + n0, 0], kv_bar, v_smem)
    keys = n0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
    # Rows past N get position N: their dk, dv are not stored.
    key_pos = gl.load(PERM + keys.to(gl.int64) * spn, mask=keys < N, other=N)
    dk = gl.zeros([ROWS, HEAD_DIM], gl.float32, acc_layout)
    dv = gl.zeros([ROWS, HEAD_DIM], gl.float32, acc_layout)
    mbarrier.wait(kv_bar, 0)

    # The producers' schedule (see _producer): a consumer needs only the tile count of (a),
    # which is unmasked, and the query positions of (b).
    t = 0
    for _ in range(count * (BLOCK // ROWS)):  # (a) query blocks of later segments
        dk, dv = _tile(dk, dv, t, k_pair, v_pair, part, zero, q_ring, do_ring, q_ready, do_ready,
                       q_empty, do_empty, lse_ring, delta_ring, 0, key_pos, qk_scale, False,
                       STAGES, HEAD_DIM)  # fmt: skip
        t += 1
    for _ in range(G):  # (b) own segment of every query head, token-level causality
        for m0 in range(first, seg_end, ROWS):
            dk, dv = _tile(dk, dv, t, k_pair, v_pair, part, zero, q_ring, do_ring, q_ready,
                           do_ready, q_empty, do_empty, lse_ring, delta_ring, m0, key_pos,
                           qk_scale, True, STAGES, HEAD_DIM)  # fmt: skip
            t += 1

    out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    pos = gl.convert_layout(key_pos, gl.SliceLayout(1, out_layout))
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, out_layout))
    dst = pos[:, None].to(gl.int64) * sgn + dims[None, :]
    ok = (pos < N)[:, None]
    gl.store(DK + dst, gl.convert_layout((dk * sm_scale).to(DK.dtype.element_ty), out_layout),
             mask=ok)  # fmt: skip
    gl.store(DV + dst, gl.convert_layout(dv.to(DV.dtype.element_ty), out_layout), mask=ok)


@gluon.jit
def _attn_bwd_dkdv_sm90(
    q_desc, do_desc, kp_desc, vp_desc, lse_desc, delta_desc, PERM, TCOUNTS, TIDX, DK, DV,
    spb, sph, spn, sgb, sgh, sgn, N, NP, NPAD, n_qb, n_kb, qk_scale, sm_scale,
    HQ: gl.constexpr, G: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr,
    SEG: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
):  # fmt: skip
    """dk, dv of BLOCK permuted key rows of one (batch, KV head), stored in original order.

    q_desc, do_desc: TMA descriptors of Q and dO as (B*HQ*N, HEAD_DIM), block (64, HEAD_DIM);
    kp_desc, vp_desc: permuted K, V as (B*HKV*NP, HEAD_DIM) (NP >= N rows per head), block
    (64, HEAD_DIM). lse_desc, delta_desc: the per-query stats as (B*HQ*NPAD,) fp32 (each
    query row padded to NPAD, a multiple of BLOCK, with lse = inf, delta = 0), block 64. PERM
    (strides spb, sph, spn), TCOUNTS, TIDX: as in ``_attn_bwd_dkdv``. DK, DV: (B, HKV, N,
    HEAD_DIM) with strides sgb, sgh, sgn. qk_scale: softmax scale times log2(e); sm_scale:
    the softmax scale. BLOCK = 2 * 64: two consumer warpgroups. Grid: (cdiv(N, BLOCK),
    B*HKV); launched with 4 warps (consumer 0).
    """
    dtype: gl.constexpr = q_desc.dtype
    HKV: gl.constexpr = HQ // G
    pid_n = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    start_n = pid_n * BLOCK

    q_ring = gl.allocate_shared_memory(dtype, [STAGES, ROWS, HEAD_DIM], q_desc.layout)
    do_ring = gl.allocate_shared_memory(dtype, [STAGES, ROWS, HEAD_DIM], do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], kp_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], vp_desc.layout)
    lse_ring = gl.allocate_shared_memory(gl.float32, [STAGES, ROWS], lse_desc.layout)
    delta_ring = gl.allocate_shared_memory(gl.float32, [STAGES, ROWS], delta_desc.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(kv_bar.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(do_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)
        mbarrier.init(do_empty.index(i), count=2)

    trow = pid_bh * n_kb + pid_n
    count = gl.load(TCOUNTS + trow)
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
            (_consumer, (0, k_smem, v_smem, kv_bar.index(0), kp_desc, vp_desc, q_ring, do_ring,
                         q_ready, do_ready, q_empty, do_empty, lse_ring, delta_ring, perm, dk_ptr,
                         dv_ptr, spn, sgn, count, first, seg_end, kv_row0, start_n, N, qk_scale,
                         sm_scale, G, HEAD_DIM, BLOCK, STAGES)),
            (_consumer, (1, k_smem, v_smem, kv_bar.index(1), kp_desc, vp_desc, q_ring, do_ring,
                         q_ready, do_ready, q_empty, do_empty, lse_ring, delta_ring, perm, dk_ptr,
                         dv_ptr, spn, sgn, count, first, seg_end, kv_row0, start_n, N, qk_scale,
                         sm_scale, G, HEAD_DIM, BLOCK, STAGES)),
            (_producer, (q_desc, q_ring, lse_desc, lse_ring, q_ready, q_empty, tidx_ptr, count,
                         bh0, first, seg_end, N, NPAD, n_qb, G, BLOCK, STAGES)),
            (_producer, (do_desc, do_ring, delta_desc, delta_ring, do_ready, do_empty, tidx_ptr,
                         count, bh0, first, seg_end, N, NPAD, n_qb, G, BLOCK, STAGES)),
        ],
        [4, 1, 1],
        [CONSUMER_REGS, 24, 24],
    )  # fmt: skip


def block_sparse_dkdv_sm90(
    q: torch.Tensor,
    do: torch.Tensor,
    kp: torch.Tensor,
    vp: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    perm: torch.Tensor,
    tcounts: torch.Tensor,
    tidx: torch.Tensor,
    n_qb: int,
    block: int,
    seg: int,
    scale: float,
    dk: torch.Tensor,
    dv: torch.Tensor,
) -> None:
    """Fill dk, dv (B, HKV, N, D) as ``_attn_bwd_dkdv`` does (same arguments, as tensors).

    q, do: (B, HQ, N, D), copied when their rows are not laid out (B*HQ*N, D); kp, vp may be
    views of longer buffers (one row spacing for both); lse, delta: contiguous (B, HQ, N) fp32.
    """
    B, HQ, N, D = q.shape
    HKV = kp.shape[1]
    kp2, vp2 = _rows(kp), _rows(vp)
    assert kp2.shape == vp2.shape, "kp and vp must space their heads alike"
    dt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([ROWS.value, D], dt)
    q_desc, do_desc, kp_desc, vp_desc = (
        TensorDescriptor.from_tensor(t, [ROWS.value, D], layout)
        for t in (_rows(q.contiguous()), _rows(do.contiguous()), kp2, vp2)
    )
    # Each query row's stats padded to a whole number of blocks: a tile's 64 values are one
    # TMA load, and queries past N get lse = inf (P = 0) and delta = 0.
    npad = triton.cdiv(N, block) * block
    stats = torch.empty(2, B * HQ, npad, device=q.device, dtype=torch.float32)
    stats[0, :, N:], stats[1, :, N:] = float("inf"), 0.0
    stats[0, :, :N], stats[1, :, :N] = lse.view(B * HQ, N), delta.view(B * HQ, N)
    stat_layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)
    lse_desc, delta_desc = (
        TensorDescriptor.from_tensor(x.view(-1), [ROWS.value], stat_layout) for x in stats
    )
    _attn_bwd_dkdv_sm90[(triton.cdiv(N, block), B * HKV)](
        q_desc, do_desc, kp_desc, vp_desc, lse_desc, delta_desc, perm, tcounts, tidx, dk, dv,
        *perm.stride(), *dk.stride()[:3], N, kp2.shape[0] // (B * HKV), npad, n_qb,
        tidx.shape[2], scale * LOG2E, scale,
        HQ=HQ, G=HQ // HKV, HEAD_DIM=D, BLOCK=block, SEG=seg, STAGES=STAGES,
        CONSUMER_REGS=CONSUMER_REGS, num_warps=4,
    )  # fmt: skip
