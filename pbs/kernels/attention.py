"""Triton kernel for step 3 of PBS-Attn: causal attention over the kept key blocks only.

One program computes BLOCK_M query rows of one (batch, query head). It visits, in order:
1. the kept key blocks of earlier segments, read from the permuted K/V (no mask: every key
   of an earlier segment precedes every query of a later one, whatever the order inside);
2. the own segment up to the query tile, read from the original K/V (no mask needed);
3. the diagonal tile(s), original K/V, with the exact token-level causal mask.
GQA reads the shared KV head directly (head // G); K/V are never repeated.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _online_softmax_step(
    acc, m_i, l_i, q, k_ptrs, v_ptrs, start_n, offs_m, N, qk_scale,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Fold one BLOCK_N tile of keys into the running (acc, max, sum); log2 domain."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        k = tl.load(k_ptrs, mask=(offs_n < N)[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if MASKED:
        s = tl.where((offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < N), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs, mask=(offs_n < N)[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _block_sparse_attn_fwd(
    Q, K, V, KP, VP, O, COUNTS, IDX,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    spkb, spkh, spkn, spvb, spvh, spvn, sob, soh, son,
    N, n_qb, n_kb, qk_scale, N_BUCKET,
    HQ: tl.constexpr, G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr, SEG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Block-sparse causal forward over per-query-block lists of kept key blocks.

    Q, O: (B, HQ, N, HEAD_DIM); K, V (original order) and KP, VP (permuted inside segments):
    (B, HQ // G, N, HEAD_DIM). COUNTS: (B, HQ, n_qb) int32; IDX: (B, HQ, n_qb, n_kb) int32,
    kept key blocks of earlier segments (indices into KP/VP, units of BLOCK tokens).
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

    # 1. Kept blocks of earlier segments, from the permuted copies.
    qb = start_m // BLOCK
    row = (b * HQ + h) * n_qb + qb
    count = tl.load(COUNTS + row)
    kp_base = KP + b * spkb + hkv * spkh
    vp_base = VP + b * spvb + hkv * spvh
    for i in range(count):
        kb = tl.load(IDX + row * n_kb + i)
        for sub in tl.static_range(BLOCK // BLOCK_N):
            start_n = kb * BLOCK + sub * BLOCK_N
            rows_n = (start_n + offs_n)[:, None].to(tl.int64)
            acc, m_i, l_i = _online_softmax_step(
                acc, m_i, l_i, q,
                kp_base + rows_n * spkn + offs_d[None, :],
                vp_base + rows_n * spvn + offs_d[None, :],
                start_n, offs_m, N, qk_scale, False, BLOCK_N,
            )  # fmt: skip

    # 2. Own segment before this query tile: original order, entirely visible.
    k_base = K + b * skb + hkv * skh
    v_base = V + b * svb + hkv * svh
    seg_start = (start_m // SEG) * SEG
    for start_n in range(seg_start, start_m, BLOCK_N):
        rows_n = (start_n + offs_n)[:, None].to(tl.int64)
        acc, m_i, l_i = _online_softmax_step(
            acc, m_i, l_i, q,
            k_base + rows_n * skn + offs_d[None, :],
            v_base + rows_n * svn + offs_d[None, :],
            start_n, offs_m, N, qk_scale, False, BLOCK_N,
        )  # fmt: skip

    # 3. Diagonal: token-level causal mask on original positions (and the sequence end).
    for start_n in range(start_m, tl.minimum(start_m + BLOCK_M, N), BLOCK_N):
        rows_n = (start_n + offs_n)[:, None].to(tl.int64)
        acc, m_i, l_i = _online_softmax_step(
            acc, m_i, l_i, q,
            k_base + rows_n * skn + offs_d[None, :],
            v_base + rows_n * svn + offs_d[None, :],
            start_n, offs_m, N, qk_scale, True, BLOCK_N,
        )  # fmt: skip

    out = acc / l_i[:, None]
    o_ptrs = O + b * sob + h * soh + offs_m[:, None].to(tl.int64) * son + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m < N)[:, None])
