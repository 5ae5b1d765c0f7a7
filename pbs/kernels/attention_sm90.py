"""Step 3 of PBS-Attn on Hopper (sm_90): the block-sparse forward written in Gluon.

The same computation as :mod:`pbs.kernels.attention` (the portable kernel, which also runs on
Triton's interpreter), organised the way FlashAttention-3 organises Hopper attention, which
Triton's compiler does not do for us:
- Warp specialisation. One program computes one selection block of queries (BLOCK rows) of one
  (batch, query head). Its consumer warpgroups (4 warps each) own 64 query rows apiece; two
  producer warps, one for K and one for V, stream the tiles by TMA into rings of ``STAGES``
  shared-memory slots, each slot with a "ready" and an "empty" mbarrier. The producers follow
  the tile schedule: kept blocks of earlier segments from the permuted copies, then the own
  segment and the diagonal from the original order.
- Intra-warpgroup overlap. A consumer issues the QK wgmma of tile t and the PV wgmma of tile
  t-1 together and runs the softmax of tile t while PV is in flight. It releases a K slot as
  soon as its QK is done and a V slot as soon as its PV is done.
The consumers run unsynchronised: explicit ping-pong (alternating their wgmma issue) measured
no faster on an H100, and the producers' registers are handed to the consumers.
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

# Triton 3.7 renamed the TMA load (async_copy_global_to_shared -> async_load): same builtin.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

LOG2E = 1.4426950408889634
ROWS = gl.constexpr(64)  # query rows per consumer warpgroup: the M of one wgmma
STAGES = 2  # slots in each of the K and V rings (2 x 2 x 32 KB at 128x128 bf16, plus Q)
# Registers per thread of the second consumer warpgroup; the producers keep 24 each.
CONSUMER_REGS = 232


@gluon.jit
def _exp2(x):
    """2^x, denormals flushed (ex2.approx.ftz.f32); see pbs.kernels.attention._exp2."""
    return gl.inline_asm_elementwise(
        "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=gl.float32, is_pure=True, pack=1
    )


@gluon.jit
def _load_tile(t, n_kept, desc_perm, desc, perm_row0, row0, own0, idx_ptr, bar, slot,
               BLOCK: gl.constexpr):  # fmt: skip
    """Start the TMA load of key (or value) tile t of the schedule into ``slot``.

    Tiles [0, n_kept) are the kept blocks of earlier segments, read from the permuted copy
    (``idx_ptr`` lists them); the rest are the own segment from ``own0`` on, up to and including
    the diagonal, read from the original order. Rows are absolute rows of the 2-D
    (heads * tokens, HEAD_DIM) views the descriptors describe.
    """
    mbarrier.expect(bar, desc.block_type.nbytes)
    if t < n_kept:
        _tma_load(desc_perm, [perm_row0 + gl.load(idx_ptr + t) * BLOCK, 0], bar, slot)
    else:
        _tma_load(desc, [row0 + own0 + (t - n_kept) * BLOCK, 0], bar, slot)


@gluon.jit
def _causal_mask(s, start_n, offs_m, cols, N):
    """-inf where key start_n + col is after query offs_m or past the sequence end."""
    keys = start_n + cols[None, :]
    return gl.where((keys <= offs_m[:, None]) & (keys < N), s, float("-inf"))


@gluon.jit
def _producer(n_tiles, n_kept, desc_perm, desc, perm_row0, row0, own0, idx_ptr, ready, empty,
              ring, BLOCK: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """One warp: loads the schedule's tiles of K (or V) into the ring, reusing a slot once
    every consumer has released it."""
    for t in range(n_tiles):
        slot = t % STAGES
        if t >= STAGES:
            mbarrier.wait(empty.index(slot), (t // STAGES - 1) & 1)
        _load_tile(t, n_kept, desc_perm, desc, perm_row0, row0, own0, idx_ptr,
                   ready.index(slot), ring.index(slot), BLOCK)  # fmt: skip


@gluon.jit
def _consumer(part: gl.constexpr, q_pair, q_bar, q_desc, k_ring, v_ring, k_ready, v_ready,
              k_empty, v_empty, O, LSE, sob, soh, son, b, h, q_row0, start_m, n_tiles, N,
              qk_scale, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              STORE_LSE: gl.constexpr):  # fmt: skip
    """One warpgroup: rows [start_m + part*ROWS, +ROWS) of the query block, over every tile;
    the last tile is the diagonal one (keys from start_m on), masked.

    Scores are in log2 units and the scale multiplies the row max, so an unmasked score costs
    one FMA before exp2. The output goes straight to O (B, HQ, N, HEAD_DIM), rows past N masked;
    with STORE_LSE each row's log2-sum-exp goes to LSE (B*HQ, N) fp32 (row q_row0 + i).
    """
    dtype: gl.constexpr = q_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    m0 = start_m + part * ROWS
    q_smem = q_pair.index(part)
    # A zero that ptxas cannot see is one (the grid is 2-D). The loop indexes Q's shared memory
    # and offsets the causal mask by t * zero, so their per-tile constants (8 wgmma descriptors,
    # 64 mask predicates a thread) are formed in the loop instead of hoisted out of it and
    # spilled: 118 spill stores in the SASS without it, 2 with it.
    zero = gl.program_id(2)
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    _tma_load(q_desc, [q_row0 + m0, 0], q_bar, q_smem)
    offs_m = m0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    no_acc = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)

    # Tile 0 starts the running max and sum.
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_ready.index(0), 0)
    s = warpgroup_mma(q_smem, k_ring.index(0).permute((1, 0)), no_acc, use_acc=False)
    mbarrier.arrive(k_empty.index(0), count=1)
    if n_tiles == 1:
        s = _causal_mask(s, start_m, offs_m, cols, N)
    m_i = gl.max(s, 1) * qk_scale
    p = _exp2(s * qk_scale - m_i[:, None])
    l_i = gl.sum(p, 1)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)

    for t in range(1, n_tiles):
        slot = t % STAGES
        prev = (t - 1) % STAGES
        mbarrier.wait(k_ready.index(slot), (t // STAGES) & 1)
        mbarrier.wait(v_ready.index(prev), ((t - 1) // STAGES) & 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        q_smem = q_pair.index(part + t * zero)
        s_tok = warpgroup_mma(q_smem, k_ring.index(slot).permute((1, 0)), no_acc, use_acc=False,
                              is_async=True)  # fmt: skip
        acc_tok = warpgroup_mma(p_op, v_ring.index(prev), acc, is_async=True)
        # wgmma groups retire in order: one outstanding means QK of t is done, PV may run on.
        s = warpgroup_mma_wait(1, deps=(s_tok,))
        mbarrier.arrive(k_empty.index(slot), count=1)
        if t == n_tiles - 1:
            s = _causal_mask(s, start_m + t * zero, offs_m, cols, N)
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        alpha = _exp2(m_i - m_new)
        p = _exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        acc, p_op = warpgroup_mma_wait(0, deps=(acc_tok, p_op))
        mbarrier.arrive(v_empty.index(prev), count=1)
        acc = acc * gl.convert_layout(alpha, o_rows)[:, None]

    if STORE_LSE:
        gl.store(LSE + q_row0 + offs_m, m_i + gl.log2(l_i), mask=offs_m < N)
    last = (n_tiles - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // STAGES) & 1)
    acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_ring.index(last), acc)

    out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    out = acc / gl.convert_layout(l_i, o_rows)[:, None]
    out = gl.convert_layout(out.to(dtype), out_layout)
    rows = m0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, out_layout))
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, out_layout))
    o_ptrs = (O + b.to(gl.int64) * sob + h.to(gl.int64) * soh
              + rows[:, None].to(gl.int64) * son + dims[None, :])  # fmt: skip
    gl.store(o_ptrs, out, mask=(rows < N)[:, None])


@gluon.jit
def _block_sparse_attn_fwd_sm90(
    q_desc, k_desc, v_desc, kp_desc, vp_desc, O, LSE, COUNTS, IDX,
    sob, soh, son, N, NP, n_qb, n_kb, qk_scale,
    HQ: gl.constexpr, G: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr,
    SEG: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
    STORE_LSE: gl.constexpr,
):  # fmt: skip
    """Block-sparse causal forward over per-query-block lists of kept key blocks.

    q_desc: TMA descriptor of Q as (B*HQ*N, HEAD_DIM), block (ROWS, HEAD_DIM); k_desc, v_desc:
    original K, V as (B*HKV*N, HEAD_DIM); kp_desc, vp_desc: permuted K, V as (B*HKV*NP,
    HEAD_DIM) (NP >= N rows per head); key/value blocks (BLOCK, HEAD_DIM). O: (B, HQ, N,
    HEAD_DIM) with strides sob, soh, son. COUNTS, IDX: as in pbs.kernels.select_blocks.
    With STORE_LSE, LSE: (B*HQ, N) fp32 receives each row's log2-sum-exp (for the backward).
    qk_scale: softmax scale times log2(e). BLOCK = 2 * ROWS: two consumer warpgroups.
    Grid: (cdiv(N, BLOCK), B*HQ), longest rows first; launched with 4 warps (consumer 0).
    Rows read past a head's end belong to the next head (or are zero past the tensor's end):
    they only reach the diagonal tile, where the mask drops them.
    """
    dtype: gl.constexpr = q_desc.dtype
    pid_m = gl.num_programs(0) - 1 - gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    start_m = pid_m * BLOCK

    q_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_DIM], q_desc.layout)
    k_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], k_desc.layout)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bar.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)

    # Tile schedule: kept blocks, own segment before the query block, diagonal.
    row = (b * HQ + h) * n_qb + start_m // BLOCK
    n_kept = gl.load(COUNTS + row)
    idx_ptr = IDX + row.to(gl.int64) * n_kb
    own0 = (start_m // SEG) * SEG
    n_tiles = n_kept + (start_m - own0) // BLOCK + 1
    kv_head = b * (HQ // G) + h // G
    perm_row0 = kv_head * NP
    row0 = kv_head * N

    gl.warp_specialize(
        [
            (_consumer, (0, q_smem, q_bar.index(0), q_desc, k_ring, v_ring, k_ready,
                         v_ready, k_empty, v_empty, O, LSE, sob, soh, son, b, h, pid_bh * N,
                         start_m, n_tiles, N, qk_scale, HEAD_DIM, BLOCK, STAGES, STORE_LSE)),
            (_consumer, (1, q_smem, q_bar.index(1), q_desc, k_ring, v_ring, k_ready,
                         v_ready, k_empty, v_empty, O, LSE, sob, soh, son, b, h, pid_bh * N,
                         start_m, n_tiles, N, qk_scale, HEAD_DIM, BLOCK, STAGES, STORE_LSE)),
            (_producer, (n_tiles, n_kept, kp_desc, k_desc, perm_row0, row0, own0, idx_ptr,
                         k_ready, k_empty, k_ring, BLOCK, STAGES)),
            (_producer, (n_tiles, n_kept, vp_desc, v_desc, perm_row0, row0, own0, idx_ptr,
                         v_ready, v_empty, v_ring, BLOCK, STAGES)),
        ],
        [4, 1, 1],
        [CONSUMER_REGS, 24, 24],
    )  # fmt: skip


def supported(q: torch.Tensor, block: int) -> bool:
    """Whether this kernel runs ``q`` (B, HQ, N, D) with selection blocks of ``block`` tokens:
    an sm_90 GPU, bf16/fp16, head dim 64 or 128, block 128 (the paper's and our default)."""
    return (
        q.is_cuda
        and torch.version.hip is None
        and torch.cuda.get_device_capability(q.device) == (9, 0)
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.shape[-1] in (64, 128)
        and block == 2 * ROWS.value
    )


def _rows(t: torch.Tensor, longer: bool = False) -> torch.Tensor:
    """(B, H, L, D) as a (B*H*R, D) view of contiguous rows of D, heads R rows apart: R = L
    (copied when not laid out so), or with ``longer`` R >= L for L rows of a longer buffer
    whose spaced rows fit its storage (kp, vp, whose spacing the kernels take)."""
    B, H, L, D = t.shape
    rows = t.stride(1) // D
    end = t.storage_offset() + B * H * rows * D  # the view's end, in elements
    longer = longer and rows > L and end * t.element_size() <= t.untyped_storage().nbytes()
    spaced = t.stride(1) == rows * D and (rows == L or longer)
    if t.stride(-1) != 1 or t.stride(-2) != D or t.stride(0) != H * t.stride(1) or not spaced:
        t, rows = t.contiguous(), L
    return t.as_strided((B * H * rows, D), (D, 1))


def block_sparse_attention_sm90(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kp: torch.Tensor,
    vp: torch.Tensor,
    counts: torch.Tensor,
    idx: torch.Tensor,
    block: int,
    seg: int,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as :func:`pbs.kernels.block_sparse_attention`; fills and returns ``out``
    (and ``lse``, a contiguous (B, HQ, N) fp32 tensor, when given).

    TMA reads Q, K and V as rows of equally spaced heads: inputs laid out otherwise
    (transformers' transposed projections) are copied first. kp/vp may be views of longer
    buffers (one row spacing for both).
    """
    B, HQ, N, D = q.shape
    HKV = k.shape[1]
    kp2, vp2 = _rows(kp, longer=True), _rows(vp, longer=True)
    assert kp2.shape == vp2.shape, "kp and vp must space their heads alike"
    dt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    q_layout = gl.NVMMASharedLayout.get_default_for([ROWS.value, D], dt)
    kv_layout = gl.NVMMASharedLayout.get_default_for([block, D], dt)
    q_desc = TensorDescriptor.from_tensor(_rows(q), [ROWS.value, D], q_layout)
    kv_descs = [
        TensorDescriptor.from_tensor(t, [block, D], kv_layout)
        for t in (_rows(k), _rows(v), kp2, vp2)
    ]
    _block_sparse_attn_fwd_sm90[(triton.cdiv(N, block), B * HQ)](
        q_desc, *kv_descs, out, lse, counts, idx, *out.stride()[:3], N,
        kp2.shape[0] // (B * HKV), idx.shape[2], idx.shape[3], scale * LOG2E,
        HQ=HQ, G=HQ // HKV, HEAD_DIM=D, BLOCK=block, SEG=seg, STAGES=STAGES,
        CONSUMER_REGS=CONSUMER_REGS, STORE_LSE=lse is not None, num_warps=4,
    )  # fmt: skip
    return out
