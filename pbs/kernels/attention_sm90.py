"""Step 3 of PBS-Attn on Hopper (sm_90): the block-sparse forward written in Gluon.

The same computation as :mod:`pbs.kernels.attention` (the portable kernel, which also runs on
Triton's interpreter), with what Hopper needs made explicit, as Triton's compiler did not:
- K and V tiles arrive by TMA into rings of ``STAGES`` shared-memory slots, each with its
  mbarrier. The loads follow the tile schedule: kept blocks of earlier segments from the
  permuted copies, then the own segment and the diagonal from the original order.
- FA3's intra-warpgroup overlap: the QK wgmma of tile t and the PV wgmma of tile t-1 are in
  flight together while the softmax of tile t runs on the CUDA cores. A K slot is refilled as
  soon as its QK is done, a V slot as soon as its PV is done.
One program computes BLOCK query rows (one selection block) of one (batch, query head), with
BLOCK // 16 warps; the query tile and the running statistics stay on chip throughout.
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
# Slots in each of the K and V rings (2 x 2 x 32 KB at 128x128 bf16 tiles, plus 32 KB of Q).
STAGES = 2


@gluon.jit
def _exp2(x):
    """2^x, denormals flushed (ex2.approx.ftz.f32); see pbs.kernels.attention._exp2."""
    return gl.inline_asm_elementwise(
        "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=gl.float32, is_pure=True, pack=1
    )


@gluon.jit
def _load_tile(t, n_kept, desc_perm, desc, perm_row0, row0, own0, idx_ptr, bar, slot,
               BLOCK: gl.constexpr, BLOCK_N: gl.constexpr):  # fmt: skip
    """Start the TMA load of key (or value) tile t of the schedule into ``slot``.

    Tiles [0, n_kept) are the kept blocks of earlier segments, read from the permuted copy
    (``idx_ptr`` lists them in BLOCK units); the rest are the own segment from ``own0`` on, up
    to and including the diagonal, read from the original order. Rows are absolute rows of the
    2-D (heads * tokens, HEAD_DIM) views the descriptors describe.
    """
    mbarrier.expect(bar, desc.block_type.nbytes)
    if t < n_kept:
        kb = gl.load(idx_ptr + t // (BLOCK // BLOCK_N))
        r = perm_row0 + kb * BLOCK + (t % (BLOCK // BLOCK_N)) * BLOCK_N
        _tma_load(desc_perm, [r, 0], bar, slot)
    else:
        _tma_load(desc, [row0 + own0 + (t - n_kept) * BLOCK_N, 0], bar, slot)


@gluon.jit
def _causal_mask(s, start_n, offs_m, cols, N):
    """-inf where key start_n + col is after query offs_m or past the sequence end."""
    keys = start_n + cols[None, :]
    return gl.where((keys <= offs_m[:, None]) & (keys < N), s, float("-inf"))


@gluon.jit
def _block_sparse_attn_fwd_sm90(
    q_desc, k_desc, v_desc, kp_desc, vp_desc, O, COUNTS, IDX,
    sob, soh, son, N, NP, n_qb, n_kb, qk_scale,
    HQ: gl.constexpr, G: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK: gl.constexpr,
    SEG: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    """Block-sparse causal forward over per-query-block lists of kept key blocks.

    q_desc: TMA descriptor of Q as (B*HQ*N, HEAD_DIM), block (BLOCK, HEAD_DIM); k_desc, v_desc:
    original K, V as (B*HKV*N, HEAD_DIM); kp_desc, vp_desc: permuted K, V as (B*HKV*NP,
    HEAD_DIM) (NP >= N rows per head); all key/value blocks (BLOCK_N, HEAD_DIM). O: (B, HQ, N,
    HEAD_DIM) with strides sob, soh, son. COUNTS, IDX: as in pbs.kernels.select_blocks.
    qk_scale: softmax scale times log2(e). Grid: (cdiv(N, BLOCK), B*HQ), longest rows first.
    Rows read past a head's end belong to the next head (or are zero past the tensor's end):
    they only reach the diagonal tile, where the mask drops them.
    """
    BLOCK_M: gl.constexpr = BLOCK
    dtype: gl.constexpr = q_desc.dtype
    pid_m = gl.num_programs(0) - 1 - gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    start_m = pid_m * BLOCK_M

    # wgmma accumulators: S = Q K^T (BLOCK_M, BLOCK_N) and O (BLOCK_M, HEAD_DIM); P feeds the
    # PV wgmma from registers.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)

    # Tile schedule: kept blocks, own segment before the query tile, diagonal tile(s).
    row = (b * HQ + h) * n_qb + start_m // BLOCK
    n_kept = gl.load(COUNTS + row) * (BLOCK // BLOCK_N)
    idx_ptr = IDX + row.to(gl.int64) * n_kb
    own0 = (start_m // SEG) * SEG
    n_diag = gl.cdiv(gl.minimum(start_m + BLOCK_M, N) - start_m, BLOCK_N)
    n_tiles = n_kept + (start_m - own0) // BLOCK_N + n_diag
    first_diag = n_tiles - n_diag
    kv_head = b * (HQ // G) + h // G
    perm_row0 = kv_head * NP
    row0 = kv_head * N

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    _tma_load(q_desc, [pid_bh * N + start_m, 0], q_bar, q_smem)
    for t in gl.static_range(STAGES):
        if t < n_tiles:
            _load_tile(t, n_kept, kp_desc, k_desc, perm_row0, row0, own0, idx_ptr,
                       k_bar.index(t), k_smem.index(t), BLOCK, BLOCK_N)  # fmt: skip
            _load_tile(t, n_kept, vp_desc, v_desc, perm_row0, row0, own0, idx_ptr,
                       v_bar.index(t), v_smem.index(t), BLOCK, BLOCK_N)  # fmt: skip

    offs_m = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    no_acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)

    # Tile 0: QK waited for at once; its softmax starts the running max and sum (log2 units;
    # the scale multiplies the row max, so an unmasked score costs one FMA before exp2).
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bar.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), no_acc, use_acc=False)
    if STAGES < n_tiles:
        _load_tile(STAGES, n_kept, kp_desc, k_desc, perm_row0, row0, own0, idx_ptr,
                   k_bar.index(0), k_smem.index(0), BLOCK, BLOCK_N)  # fmt: skip
    if first_diag == 0:
        s = _causal_mask(s, start_m, offs_m, cols, N)
    m_i = gl.max(s, 1) * qk_scale
    p = _exp2(s * qk_scale - m_i[:, None])
    l_i = gl.sum(p, 1)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)

    for t in range(1, n_tiles):
        slot = t % STAGES
        prev = (t - 1) % STAGES
        mbarrier.wait(k_bar.index(slot), (t // STAGES) & 1)
        s_tok = warpgroup_mma(q_smem, k_smem.index(slot).permute((1, 0)), no_acc,
                              use_acc=False, is_async=True)  # fmt: skip
        mbarrier.wait(v_bar.index(prev), ((t - 1) // STAGES) & 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        acc_tok = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        # wgmma groups retire in order: one outstanding means QK of t is done, PV may run on.
        s = warpgroup_mma_wait(1, deps=(s_tok,))
        if t + STAGES < n_tiles:
            _load_tile(t + STAGES, n_kept, kp_desc, k_desc, perm_row0, row0, own0, idx_ptr,
                       k_bar.index(slot), k_smem.index(slot), BLOCK, BLOCK_N)  # fmt: skip
        if t >= first_diag:
            s = _causal_mask(s, start_m + (t - first_diag) * BLOCK_N, offs_m, cols, N)
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        alpha = _exp2(m_i - m_new)
        p = _exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        acc, p_op = warpgroup_mma_wait(0, deps=(acc_tok, p_op))
        if t - 1 + STAGES < n_tiles:
            _load_tile(t - 1 + STAGES, n_kept, vp_desc, v_desc, perm_row0, row0, own0, idx_ptr,
                       v_bar.index(prev), v_smem.index(prev), BLOCK, BLOCK_N)  # fmt: skip
        acc = acc * gl.convert_layout(alpha, o_rows)[:, None]

    last = (n_tiles - 1) % STAGES
    mbarrier.wait(v_bar.index(last), ((n_tiles - 1) // STAGES) & 1)
    acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(last), acc)
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bar.index(i))
        mbarrier.invalidate(v_bar.index(i))

    out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    out = acc / gl.convert_layout(l_i, o_rows)[:, None]
    out = gl.convert_layout(out.to(dtype), out_layout)
    rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_layout))
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, out_layout))
    o_ptrs = (O + b.to(gl.int64) * sob + h.to(gl.int64) * soh
              + rows[:, None].to(gl.int64) * son + dims[None, :])  # fmt: skip
    gl.store(o_ptrs, out, mask=(rows < N)[:, None])


def supported(q: torch.Tensor, block: int) -> bool:
    """Whether this kernel runs ``q`` (B, HQ, N, D) with selection blocks of ``block`` tokens:
    an sm_90 GPU, bf16/fp16, head dim 64 or 128, block 64 or 128."""
    return (
        q.is_cuda
        and torch.version.hip is None
        and torch.cuda.get_device_capability(q.device) == (9, 0)
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.shape[-1] in (64, 128)
        and block in (64, 128)
    )


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) with contiguous rows of D and heads L rows apart, as a (B*H*L, D) view."""
    if t.stride(-1) != 1 or t.stride(-2) != t.shape[-1] or t.stride(0) != t.shape[1] * t.stride(1):
        t = t.contiguous()
    rows = t.stride(1) // t.shape[-1]  # L, or more for a view of a longer buffer
    return t.as_strided((t.shape[0] * t.shape[1] * rows, t.shape[-1]), (t.shape[-1], 1))


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
) -> torch.Tensor:
    """Same contract as :func:`pbs.kernels.block_sparse_attention`; fills and returns ``out``.

    TMA reads Q, K and V as rows of equally spaced heads: inputs laid out otherwise
    (transformers' transposed projections) are copied first. kp/vp may be views of longer
    buffers (one row spacing for both).
    """
    B, HQ, N, D = q.shape
    HKV = k.shape[1]
    kp2, vp2 = _rows(kp), _rows(vp)
    assert kp2.shape == vp2.shape, "kp and vp must space their heads alike"
    block_n = block  # 128x128 tiles: 8% faster than 128x64 on an H100 (bench/results/pbs.md)
    dt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([block_n, D], dt)

    def desc(t2d):
        return TensorDescriptor.from_tensor(t2d, [block_n, D], layout)

    descs = [desc(t) for t in (_rows(q), _rows(k), _rows(v), kp2, vp2)]
    _block_sparse_attn_fwd_sm90[(triton.cdiv(N, block), B * HQ)](
        *descs, out, counts, idx, *out.stride()[:3], N, kp2.shape[0] // (B * HKV),
        idx.shape[2], idx.shape[3], scale * LOG2E,
        HQ=HQ, G=HQ // HKV, HEAD_DIM=D, BLOCK=block, SEG=seg, BLOCK_N=block_n, STAGES=STAGES,
        num_warps=block // 16,
    )  # fmt: skip
    return out
