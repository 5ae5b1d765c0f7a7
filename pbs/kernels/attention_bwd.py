"""Triton kernels for the backward of step 3 (FlashAttention-2 style, any GPU and the interpreter).

The forward's schedule per query row i: the kept key blocks of earlier segments (permuted K/V),
then the keys of its own segment up to i (original K/V). The backward recomputes the
probabilities from the forward's log-sum-exp and runs over the same schedule from both sides:

- ``_attn_bwd_delta``: delta_i = rowsum(dO_i * O_i).
- ``_attn_bwd_dq``: one program per query tile, over the forward's block list, exactly as the
  forward visits it; dq = scale * sum_j dS_ij k_j.
- ``_attn_bwd_dkdv``: one program per tile of *permuted* key rows of one KV head, for every query
  head of its group (GQA-native: K/V are never repeated). It visits (a) the query blocks that
  kept its key block (the transposed block list) and (b) the queries of its own segment at or
  after each key's original position (token-level mask). Because a permuted row is a key of
  the same segment, (b) covers its own-segment gradient too: the tile then holds the complete
  dk, dv of its keys and stores them at their original positions (perm), so every row of dk
  and dv is written exactly once, without atomics. It computes the scores transposed (keys as
  rows), as Triton's fused-attention tutorial does: 1.27x faster at 128K on an H100 than
  transposing P and dS for the dk, dv products. (Accumulating dq here too, by fp32 atomics,
  instead of the dq kernel measured 1.17x slower than the two kernels.)

Scores are in log2 units: p = exp2(q.k * qk_scale - lse) with qk_scale = scale * log2(e).
On Hopper one Gluon kernel computes dq, dk and dv instead (:mod:`pbs.kernels.attention_bwd_sm90`,
the dk/dv schedule, dq added by TMA reduce-add).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention import _exp2


@triton.jit
def _attn_bwd_delta(
    O, DO, DELTA, sob, soh, son, sdb, sdh, sdn, N,
    HQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """DELTA: (B*HQ, N) fp32 = rowsum(dO * O). O, DO: (B, HQ, N, HEAD_DIM). Grid:
    (cdiv(N, BLOCK_M), B*HQ)."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = (pid_bh % HQ).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None].to(tl.int64)
    ok = (offs_m < N)[:, None]
    o = tl.load(O + b * sob + h * soh + rows * son + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows * sdn + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _dq_step(
    dq, q, do, lse, delta, k, v, start_n, offs_m, N, qk_scale,
    MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dq += dS @ k for one BLOCK_N tile of keys (dS = P * (dP - delta), unscaled)."""
    p = _exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
    if MASKED:  # the diagonal: token-level causality and the sequence end
        offs_n = start_n + tl.arange(0, BLOCK_N)
        p = tl.where((offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < N), p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, KP, VP, DO, DQ, LSE, DELTA, COUNTS, IDX,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    spkb, spkh, spkn, spvb, spvh, spvn, sdb, sdh, sdn, sgb, sgh, sgn,
    N, n_qb, n_kb, qk_scale, sm_scale, N_BUCKET,
    HQ: tl.constexpr, G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr, SEG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """DQ (B, HQ, N, HEAD_DIM), strides sgb, sgh, sgn. Arguments as in the forward kernel, plus
    DO (strides sd*), LSE and DELTA (B*HQ, N) fp32. Grid: (cdiv(N, BLOCK_M), B*HQ).
    N_BUCKET only keys the autotuner."""
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
    rows = offs_m[:, None].to(tl.int64)
    row_ok = offs_m < N
    q = tl.load(Q + b * sqb + h * sqh + rows * sqn + offs_d[None, :], mask=row_ok[:, None],
                other=0.0)  # fmt: skip
    do = tl.load(DO + b * sdb + h * sdh + rows * sdn + offs_d[None, :], mask=row_ok[:, None],
                 other=0.0)  # fmt: skip
    lse = tl.load(LSE + pid_bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # 1. Kept blocks of earlier segments (permuted K/V), as the forward lists them.
    kp_base = KP + b * spkb + hkv * spkh
    vp_base = VP + b * spvb + hkv * spvh
    row = (b * HQ + h) * n_qb + start_m // BLOCK
    count = tl.load(COUNTS + row)
    for i in tl.range(0, count):
        kb = tl.load(IDX + row * n_kb + i)
        for sub in tl.static_range(BLOCK // BLOCK_N):
            start_n = kb * BLOCK + sub * BLOCK_N
            r = tl.cast(start_n, tl.int64) + offs_n[:, None]
            k = tl.load(kp_base + r * spkn + offs_d[None, :])
            v = tl.load(vp_base + r * spvn + offs_d[None, :])
            dq = _dq_step(dq, q, do, lse, delta, k, v, start_n, offs_m, N, qk_scale, False, BLOCK_N)

    # 2. Own segment before this tile, then 3. the diagonal (original K/V).
    k_base = K + b * skb + hkv * skh
    v_base = V + b * svb + hkv * svh
    for start_n in tl.range((start_m // SEG) * SEG, start_m, BLOCK_N):
        r = tl.cast(start_n, tl.int64) + offs_n[:, None]
        k = tl.load(k_base + r * skn + offs_d[None, :])
        v = tl.load(v_base + r * svn + offs_d[None, :])
        dq = _dq_step(dq, q, do, lse, delta, k, v, start_n, offs_m, N, qk_scale, False, BLOCK_N)
    for start_n in tl.range(start_m, tl.minimum(start_m + BLOCK_M, N), BLOCK_N):
        r = tl.cast(start_n, tl.int64) + offs_n[:, None]
        inside = (start_n + offs_n < N)[:, None]
        k = tl.load(k_base + r * skn + offs_d[None, :], mask=inside, other=0.0)
        v = tl.load(v_base + r * svn + offs_d[None, :], mask=inside, other=0.0)
        dq = _dq_step(dq, q, do, lse, delta, k, v, start_n, offs_m, N, qk_scale, True, BLOCK_N)

    dq_ptrs = DQ + b * sgb + h * sgh + rows * sgn + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_step(
    dk, dv, k, v, key_pos, q_base, do_base, lse_base, delta_base, start_m, N, qk_scale,
    sqn, sdn, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Fold the BLOCK_M queries from start_m (one query head) into the key tile's dk, dv.

    Works on transposed scores, keys as rows (P^T = exp2(K Q^T - lse)), so that P^T and dS^T
    feed the dv and dk products as they come out of the previous product, without a
    transpose through shared memory. key_pos: (BLOCK_N,) original positions of the tile's
    keys; with MASKED a query sees a key only at or after it (own segment). Rows past N load
    zeros and an infinite lse, so their probabilities are exactly 0.
    """
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    q_t = tl.load(q_base + offs_m[None, :].to(tl.int64) * sqn + offs_d[:, None],
                  mask=row_ok[None, :], other=0.0)  # (HEAD_DIM, BLOCK_M)  # fmt: skip
    do = tl.load(do_base + offs_m[:, None].to(tl.int64) * sdn + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)  # fmt: skip
    lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    p_t = _exp2(tl.dot(k, q_t) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
    if MASKED:
        p_t = tl.where(offs_m[None, :] >= key_pos[:, None], p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv)
    dp_t = tl.dot(v, tl.trans(do))
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, KP, VP, DO, DK, DV, LSE, DELTA, PERM, TIDX, ITEMS,
    sqb, sqh, sqn, spkb, spkh, spkn, spvb, spvh, spvn, sdb, sdh, sdn,
    spb, sph, spn, sgb, sgh, sgn,
    N, n_qb, n_kb, qk_scale, sm_scale, N_BUCKET,
    HQ: tl.constexpr, G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr, SEG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One work item's contributions to dk, dv of BLOCK_N permuted key rows of one (batch, KV
    head), added in original order.

    KP, VP: (B, HKV, N, HEAD_DIM) permuted keys/values; PERM: (B, HKV, N) int32 original
    position of each permuted row. TIDX: (B, HKV, n_kb, G*n_qb) int32 lists, per permuted key
    block, the (query head in group * n_qb + query block) entries that kept it; ITEMS: the
    rows of :func:`pbs.kernels.work_items`. DK, DV: (B, HKV, N, HEAD_DIM) fp32, zeroed, with
    strides sgb, sgh, sgn. Grid: (BLOCK // BLOCK_N, n_items). N_BUCKET only keys the autotuner.
    """
    item = ITEMS + tl.program_id(1) * (2 + 2 * G)
    trow = tl.load(item)  # (batch * HKV + KV head) * n_kb + key block
    pid_bh = trow // n_kb
    HKV: tl.constexpr = HQ // G
    b = (pid_bh // HKV).to(tl.int64)
    hkv = (pid_bh % HKV).to(tl.int64)
    start_n = (trow % n_kb) * BLOCK + tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < N
    cols = offs_n[:, None].to(tl.int64)
    # Rows past N get position N: no query is at or after it, so they stay zero.
    key_pos = tl.load(PERM + b * spb + hkv * sph + offs_n * spn, mask=col_ok, other=N)
    k = tl.load(KP + b * spkb + hkv * spkh + cols * spkn + offs_d[None, :], mask=col_ok[:, None],
                other=0.0)  # fmt: skip
    v = tl.load(VP + b * spvb + hkv * spvh + cols * spvn + offs_d[None, :], mask=col_ok[:, None],
                other=0.0)  # fmt: skip
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    # (a) The region's query blocks (of later segments) that kept this key block: no mask.
    for g in tl.range(0, G):
        h = hkv * G + g
        bh = b * HQ + h
        for e in tl.range(tl.load(item + 2 + g), tl.load(item + 2 + G + g)):
            entry = tl.load(TIDX + trow.to(tl.int64) * (G * n_qb) + e)
            for sub in tl.static_range(BLOCK // BLOCK_M):
                start_m = (entry % n_qb) * BLOCK + sub * BLOCK_M
                dk, dv = _dkdv_step(
                    dk, dv, k, v, key_pos, Q + b * sqb + h * sqh, DO + b * sdb + h * sdh,
                    LSE + bh * N, DELTA + bh * N, start_m, N, qk_scale, sqn, sdn,
                    False, HEAD_DIM, BLOCK_M,
                )  # fmt: skip

    # (b) In one item per key block: the own segment's queries at or after the tile's
    # earliest key.
    seg0 = (start_n // SEG) * SEG
    first = tl.min(key_pos, 0)
    first = seg0 + ((first - seg0) // BLOCK_M) * BLOCK_M
    seg_end = tl.minimum(seg0 + SEG, N)
    for g in tl.range(0, G * tl.load(item + 1)):
        h = hkv * G + g
        bh = b * HQ + h
        for start_m in tl.range(first, seg_end, BLOCK_M):
            dk, dv = _dkdv_step(
                dk, dv, k, v, key_pos, Q + b * sqb + h * sqh, DO + b * sdb + h * sdh,
                LSE + bh * N, DELTA + bh * N, start_m, N, qk_scale, sqn, sdn,
                True, HEAD_DIM, BLOCK_M,
            )  # fmt: skip

    # Un-permute: added at the rows' original positions.
    dst = b * sgb + hkv * sgh + key_pos[:, None].to(tl.int64) * sgn + offs_d[None, :]
    tl.atomic_add(DK + dst, dk * sm_scale, mask=col_ok[:, None], sem="relaxed")
    tl.atomic_add(DV + dst, dv, mask=col_ok[:, None], sem="relaxed")
