"""Triton kernel for step 3 of PBS-Attn: causal attention over the kept key blocks only.

One program computes BLOCK_M query rows of one (batch, query head). It visits, in order:
1. the kept key blocks of earlier segments, read from the permuted K/V (no mask: every key
   of an earlier segment precedes every query of a later one, whatever the order inside);
2. the own segment up to the query tile, read from the original K/V (no mask needed);
3. the diagonal tile(s), original K/V, with the exact token-level causal mask.
GQA reads the shared KV head directly (head // G); K/V are never repeated.
This is the portable kernel (any GPU, and Triton's interpreter for the CPU tests); on Hopper
the triton backend runs the warp-specialised twin in attention_sm90.py instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Inline PTX needs an NVIDIA GPU: not the interpreter (read at import, as triton.jit does), not ROCm.
_PTX = tl.constexpr(not triton.knobs.runtime.interpret and not torch.version.hip)


@triton.jit
def _exp2(x):
    """2^x with denormal results flushed to zero (ex2.approx.ftz.f32).

    tl.exp2 emits the non-ftz instruction, whose denormal fix-up costs ALU work in the softmax,
    the kernel's bottleneck: ftz is 2% faster at 128K on an H100, with identical outputs there.
    A probability below 2^-126 is nothing at bf16/fp16 precision.
    """
    if _PTX:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.exp2(x)


@triton.jit
def _online_softmax_step(
    acc, m_i, l_i, q, k, v, start_n, offs_m, N, qk_scale,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Fold one BLOCK_N tile of keys into the running (acc, max, sum); log2 domain.

    The scale multiplies the row max rather than the tile, so the unmasked path costs one
    fused multiply-subtract per score before exp2.
    """
    qk = tl.dot(q, tl.trans(k))
    if MASKED:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < N)
        qk = tl.where(keep, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        qk = qk - m_new[:, None]
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_new[:, None]
    p = _exp2(qk)
    alpha = _exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _block_sparse_attn_fwd(
    Q, K, V, KP, VP, O, LSE, COUNTS, IDX,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    spkb, spkh, spkn, spvb, spvh, spvn, sob, soh, son,
    N, n_qb, n_kb, qk_scale, N_BUCKET,
    HQ: tl.constexpr, G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr, SEG: tl.constexpr, STORE_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Block-sparse causal forward over per-query-block lists of kept key blocks.

    Q, O: (B, HQ, N, HEAD_DIM); K, V (original order) and KP, VP (permuted inside segments):
    (B, HQ // G, N, HEAD_DIM). COUNTS: (B, HQ, n_qb) int32; IDX: (B, HQ, n_qb, n_kb) int32,
    kept key blocks of earlier segments (indices into KP/VP, units of BLOCK tokens).
    With STORE_LSE, LSE: (B*HQ, N) fp32 receives each row's log2-sum-exp of the scaled scores
    (log2 units, qk_scale included), which the backward needs.
    Grid: (cdiv(N, BLOCK_M), B*HQ), query tiles in reverse so the longest rows start first.
    N_BUCKET only keys the autotuner.
    """
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    hkv = (h // G).to(tl.int64)
    h = h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :],
                mask=(offs_m < N)[:, None], other=0.0)  # fmt: skip
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # 1. Kept blocks of earlier segments, from the permuted copies. Tile offsets are built once;
    # each tile only adds its (int64) row start.
    kp_tile = offs_n[:, None] * spkn + offs_d[None, :]
    vp_tile = offs_n[:, None] * spvn + offs_d[None, :]
    kp_base = KP + b * spkb + hkv * spkh
    vp_base = VP + b * spvb + hkv * spvh
    row = (b * HQ + h) * n_qb + start_m // BLOCK
    count = tl.load(COUNTS + row)
    for i in tl.range(0, count):
        kb = tl.load(IDX + row * n_kb + i)
        for sub in tl.static_range(BLOCK // BLOCK_N):
            start_n = kb * BLOCK + sub * BLOCK_N
            r = tl.cast(start_n, tl.int64)
            k = tl.load(kp_base + r * spkn + kp_tile)
            v = tl.load(vp_base + r * spvn + vp_tile)
            acc, m_i, l_i = _online_softmax_step(
                acc, m_i, l_i, q, k, v, start_n, offs_m, N, qk_scale, False, BLOCK_N
            )

    # 2. Own segment before this query tile: original order, entirely visible.
    k_tile = offs_n[:, None] * skn + offs_d[None, :]
    v_tile = offs_n[:, None] * svn + offs_d[None, :]
    k_base = K + b * skb + hkv * skh
    v_base = V + b * svb + hkv * svh
    for start_n in tl.range((start_m // SEG) * SEG, start_m, BLOCK_N):
        r = tl.cast(start_n, tl.int64)
        k = tl.load(k_base + r * skn + k_tile)
        v = tl.load(v_base + r * svn + v_tile)
        acc, m_i, l_i = _online_softmax_step(
            acc, m_i, l_i, q, k, v, start_n, offs_m, N, qk_scale, False, BLOCK_N
        )

    # 3. Diagonal: token-level causal mask on original positions (and the sequence end).
    for start_n in tl.range(start_m, tl.minimum(start_m + BLOCK_M, N), BLOCK_N):
        r = tl.cast(start_n, tl.int64)
        inside = (start_n + offs_n < N)[:, None]
        k = tl.load(k_base + r * skn + k_tile, mask=inside, other=0.0)
        v = tl.load(v_base + r * svn + v_tile, mask=inside, other=0.0)
        acc, m_i, l_i = _online_softmax_step(
            acc, m_i, l_i, q, k, v, start_n, offs_m, N, qk_scale, True, BLOCK_N
        )

    out = acc / l_i[:, None]
    o_ptrs = O + b * sob + h * soh + offs_m[:, None].to(tl.int64) * son + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m < N)[:, None])
    if STORE_LSE:
        tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=offs_m < N)
