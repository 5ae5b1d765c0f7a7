"""Triton kernels for step 1 of PBS-Attn: key importance and the segment-wise permutation.

Key importance is the softmax attention of the last query block onto every key, averaged over
those queries and over the query heads that share a KV head (GQA). It is computed in two
passes so that no (queries x N) float tensor is ever stored: pass 1 finds each query's
log-sum-exp over all keys, pass 2 recomputes the logits tile by tile and sums the normalised
probabilities per key.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _last_block_lse_kernel(
    Q, K, M_out, L_out,
    sqb, sqh, sqn, skb, skh, skn,
    N, R, CHUNK, scale_log2,
    G: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Partial softmax statistics of the last R queries over one chunk of keys.

    Grid: (cdiv(G*R, BLOCK_Q), B*HKV, n_chunks). Row r of a KV head is query head
    hkv*G + r // R at position N - R + r % R.
    Writes M_out, L_out: (B*HKV, G*R, n_chunks) fp32, running max (log2 units) and sum.
    """
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    chunk = tl.program_id(2)
    n_chunks = tl.num_programs(2)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < G * R
    pos = N - R + rows % R
    head = hkv * G + rows // R
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b.to(tl.int64) * sqb + head[:, None].to(tl.int64) * sqh
    q = tl.load(q_ptrs + pos[:, None].to(tl.int64) * sqn + offs_d[None, :], mask=row_ok[:, None])
    k_base = K + b.to(tl.int64) * skb + hkv.to(tl.int64) * skh
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    lo = chunk * CHUNK
    hi = tl.minimum(lo + CHUNK, N)
    for start in range(lo, hi, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        k = tl.load(k_base + offs_k[:, None].to(tl.int64) * skn + offs_d[None, :],
                    mask=(offs_k < N)[:, None])  # fmt: skip
        s = tl.dot(q, tl.trans(k)) * scale_log2
        # Causal inside the last block: query at pos sees keys <= pos.
        ok = (offs_k[None, :] <= pos[:, None]) & (offs_k[None, :] < N)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    out = pid_bh.to(tl.int64) * G * R * n_chunks + rows * n_chunks + chunk
    tl.store(M_out + out, m_i, mask=row_ok)
    tl.store(L_out + out, l_i, mask=row_ok)


@triton.jit
def _key_importance_kernel(
    Q, K, LSE, IMP,
    sqb, sqh, sqn, skb, skh, skn,
    N, R, scale_log2, inv_rows,
    G: tl.constexpr, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Mean softmax probability that the last R queries (of all G heads) give each key.

    Grid: (cdiv(N, BLOCK_K), B*HKV). LSE: (B*HKV, G*R) fp32 log2-sum-exp per query row.
    Writes IMP: (B*HKV, N) fp32.
    """
    pid_k = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, HEAD_DIM)
    k_base = K + b.to(tl.int64) * skb + hkv.to(tl.int64) * skh
    k = tl.load(k_base + offs_k[:, None].to(tl.int64) * skn + offs_d[None, :],
                mask=(offs_k < N)[:, None])  # fmt: skip
    acc = tl.zeros([BLOCK_K], tl.float32)
    for start in range(0, G * R, BLOCK_Q):
        rows = start + tl.arange(0, BLOCK_Q)
        row_ok = rows < G * R
        pos = N - R + rows % R
        head = hkv * G + rows // R
        q_ptrs = Q + b.to(tl.int64) * sqb + head[:, None].to(tl.int64) * sqh
        q = tl.load(q_ptrs + pos[:, None].to(tl.int64) * sqn + offs_d[None, :],
                    mask=row_ok[:, None])  # fmt: skip
        lse = tl.load(LSE + pid_bh.to(tl.int64) * G * R + rows, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2 - lse[:, None]
        ok = (offs_k[None, :] <= pos[:, None]) & row_ok[:, None] & (offs_k[None, :] < N)
        acc += tl.sum(tl.where(ok, tl.exp2(s), 0.0), 0)
    tl.store(IMP + pid_bh.to(tl.int64) * N + offs_k, acc * inv_rows, mask=offs_k < N)


@triton.jit
def _permute_rows_kernel(
    K, V, PERM, KP, VP,
    skb, skh, skn, svb, svh, svn, spb, sph, spn, sqb_, sqh_, sqn_,
    N,
    HKV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Gather K and V rows in permuted order: KP[i] = K[PERM[i]], VP[i] = V[PERM[i]].

    Grid: (cdiv(N, BLOCK), B*HKV). PERM: (B, HKV, N) int32. KP, VP share strides (sqb_, ...).
    One pass over K and V; the permuted copies are what the attention kernel streams.
    """
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    h = (pid_bh % HKV).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    offs_d = tl.arange(0, HEAD_DIM)
    src = tl.load(PERM + b * spb + h * sph + offs * spn, mask=ok, other=0).to(tl.int64)
    k = tl.load(K + b * skb + h * skh + src[:, None] * skn + offs_d[None, :], mask=ok[:, None])
    v = tl.load(V + b * svb + h * svh + src[:, None] * svn + offs_d[None, :], mask=ok[:, None])
    dst = b * sqb_ + h * sqh_ + offs[:, None].to(tl.int64) * sqn_ + offs_d[None, :]
    tl.store(KP + dst, k, mask=ok[:, None])
    tl.store(VP + dst, v, mask=ok[:, None])
