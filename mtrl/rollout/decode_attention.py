"""Split-KV ("flash-decoding") attention for one-token decode steps over a static KV cache.

    out = decode_attention(q, k, v, mask, scale, last_key=None)  # (B, KVH, R, D), q's dtype
    out = decode_attention(q, k_cache, v_cache, mask, scale, last_key=pos, new_k=k, new_v=v)

Shapes (the engine's ``_decode_attention`` layout, grouped-query heads folded into the rows):
  q:    (B, KVH, R, D); R = (query heads / KV heads) * query length, the rows sharing a KV head
  k, v: (B, KVH, n, D), usually ``cache[:, :, :n]``, non-contiguous slices of a longer static
        cache: strides are passed, nothing is copied (only the last dim must be contiguous)
  mask: (B, n) or (B, 1, 1, n) additive float mask, any float dtype, 0 or -inf (a longer last
        dim is fine: its first n columns are used); every row should keep at least one key
  scale: softmax scale applied to q.k (default 1 / sqrt(D))
  last_key: optional 0-dim integer tensor on q's device, the last key index any row attends
        to; the keys after it are not read (their mask must be -inf), and the keys up to it
        are spread evenly over the splits. The bound is read on the device, so the engine
        captures one CUDA graph over the whole static cache for every decode step.
  new_k, new_v: optional (B, KVH, 1, D), the step's key and value (with last_key < n): the
        launch stores them into k and v at last_key and attends over the cache with them in
        it, so a decode step writes its cache in the attention kernel, not in two more a layer.
D must be a power of two in 16..256.

Why split: a decode step has B * KVH (batch, KV head) pairs, each with only R query rows, so a
kernel with one program per pair (what SDPA backends launch) puts ~128 programs on ~132 SMs,
each streaming the whole key range: far from the memory-bandwidth floor. Here the key range is
cut into ``num_splits`` chunks of whole BLOCK_N tiles, and ``_split_kv_kernel`` runs one
program per (batch, KV head, split), grid (B * KVH, num_splits):
1. a program folds its key chunk into an online softmax for all R rows; scores are an
   (R padded to 16) x BLOCK_N ``tl.dot``; statistics in fp32, log2 units (exp2, the scale
   times log2(e) folded into one multiply);
2. with one split it normalises and writes the output; otherwise it writes its unnormalised
   partial output and running max and sum per row (fp32 scratch) and counts itself in a
   per-(batch, KV head) arrival counter; the program that arrives last merges the splits with
   the log-sum-exp trick (``_merge_splits``; a split whose keys are all masked has max -inf and
   sum 0 and gets weight 0, no NaN) and sets the counter back to zero.
So a step is one launch whatever the split count: a separate merge kernel would cost a launch
per layer, which at short key ranges outweighs what the extra programs gain.

Arrival counters: ``mtrl.arrivals`` (one per (batch, KV head), zero between launches).

``torch.compile``: the launch is the custom operator ``torch.ops.mtrl.decode_attention``, or
``decode_attention_append`` (declared to mutate k and v) with new_k/new_v, each with a fake
implementation for tracing, so a compiled decode step traces through it in one graph.

Graph capture: the launch logic reads shapes only (no host synchronisation, no ``.item()``);
the scratch buffers come from ``torch.empty`` (the graph's memory pool when captured), the
arrival counters from the first call before the capture. Tiles are fixed launch parameters,
not autotuned, so the first call compiles and later calls and captures reuse the kernel.

Numerics: softmax statistics and the accumulator are fp32; P is rounded to K/V's dtype before
the P @ V product (as in FlashAttention). On a GPU fp32 inputs go through TF32 ``tl.dot``.
Masked scores are multiplied by log2(e), so a finite mask value below about -2.4e38 counts as
-inf. A row with every key masked gives 0, not NaN.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from mtrl.arrivals import arrival_counters, last_to_arrive

LOG2E = 1.4426950408889634
# Kernels may read only constexpr globals.
_LOG2E = tl.constexpr(LOG2E)
# Split heuristic (CUDA): about PROGRAMS_PER_SM programs per SM, with at least
# MIN_KEYS_PER_SPLIT keys each. More splits put more loads in flight, but each split pays its
# own prologue and partial write, and at short key ranges that loses (H100, B=64, KVH=2, the
# engine's call, bench/results/decode_attention.md: 256 live keys of a 512-position cache, one
# split 12.3 us, two 14.0, four 15.8; 2,048 live keys, two splits 53.6 us, four 59.0, one 57.9).
PROGRAMS_PER_SM = 2
MIN_KEYS_PER_SPLIT = 512
# Tiles: BLOCK_N keys a step; three stages keep two tiles' loads in flight while one is
# multiplied (same runs: one split 12.3 vs 14.2 us with two stages at 256 keys, 57.9 vs 76.8 at
# 2,048).
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 3
CPU_SPLITS = 4


@triton.jit
def _split_kv_kernel(
    Q, K, V, MASK, LAST_KEY, K_NEW, V_NEW, O, O_PART, M, L, ARRIVED,
    sqb, sqh, sqr, skb, skh, skn, svb, svh, svn, smb, smn, sknb, sknh, svnb, svnh,
    KVH, R, n_keys, chunk, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, FINAL: tl.constexpr,
    HAS_LAST_KEY: tl.constexpr, APPEND: tl.constexpr,
):  # fmt: skip
    """Online softmax of all R rows of one (batch, KV head) over one chunk of keys.

    Grid: (B * KVH, num_splits); split s covers keys [s * chunk, min((s + 1) * chunk, n_keys)),
    chunk a multiple of BLOCK_N. qk_scale = scale * log2(e). HAS_LAST_KEY: only the keys up to
    the index stored at LAST_KEY are read, and chunk is recomputed from their count so that
    they spread evenly over the splits (a split with none writes an empty partial).
    APPEND (with HAS_LAST_KEY): K_NEW, V_NEW (B, KVH, 1, D) are the step's key and value; the
    first split stores them at index LAST_KEY of K and V, and every split uses them in place of
    whatever it loads there, so no program depends on another's store.
    O: the (B, KVH, R, D) output. FINAL (num_splits == 1): the program writes it normalised.
    Otherwise every program writes its partial to O_PART (B * KVH, num_splits, R, D) fp32
    (unnormalised sums of p * v), M and L (B * KVH, num_splits, R) fp32 (running max in log2
    units, sum of p), then counts itself in ARRIVED[pid_bh] (int32, zero between launches); the
    last of the splits to arrive merges them all into O and sets the count back to zero.
    """
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // KVH).to(tl.int64)
    h = (pid_bh % KVH).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_r < R

    # Padded rows (R..BLOCK_R) read zeros: tl.dot needs at least 16 rows.
    q = tl.load(
        Q + b * sqb + h * sqh + offs_r[:, None] * sqr + offs_d[None, :],
        mask=row_ok[:, None], other=0.0,
    )  # fmt: skip
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    mask_base = MASK + b * smb

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], tl.float32)
    n_live = n_keys
    if HAS_LAST_KEY:
        # The live keys [0, last] are cut into the launched splits here, on the device: a
        # graph captured over the whole cache spreads each step's keys over all its splits.
        n_live = tl.minimum(n_keys, tl.load(LAST_KEY).to(tl.int32) + 1)
        chunk = tl.cdiv(tl.cdiv(n_live, BLOCK_N), tl.num_programs(1)) * BLOCK_N
    if APPEND:
        last = n_live - 1
        k_new = tl.load(K_NEW + b * sknb + h * sknh + offs_d)
        v_new = tl.load(V_NEW + b * svnb + h * svnh + offs_d)
        if split == 0:
            tl.store(k_base + last * skn + offs_d, k_new)
            tl.store(v_base + last * svn + offs_d, v_new)
    start = split * chunk
    end = tl.minimum(start + chunk, n_live)
    for start_n in tl.range(start, end, BLOCK_N):
        cols = start_n + offs_n
        inside = cols < end
        k = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=inside[:, None], other=0.0)
        v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=inside[:, None], other=0.0)
        if APPEND:
            fresh = (cols == last)[:, None]
            k = tl.where(fresh, k_new[None, :], k)
            v = tl.where(fresh, v_new[None, :], v)
        bias = tl.load(mask_base + cols * smn, mask=inside, other=float("-inf")).to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * qk_scale + bias[None, :] * _LOG2E
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While every key so far is masked m_new is -inf; subtracting 0 instead keeps
        # exp2(-inf - -inf) = NaN out: p and alpha are 0, acc and l_i stay 0.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    if FINAL:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_row = pid_bh.to(tl.int64) * R + offs_r
        tl.store(O + o_row[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None])  # fmt: skip
    else:
        num_splits = tl.num_programs(1)
        part = (pid_bh * num_splits + split).to(tl.int64) * R + offs_r
        tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(M + part, m_i, mask=row_ok)
        tl.store(L + part, l_i, mask=row_ok)
        if last_to_arrive(ARRIVED + pid_bh, num_splits):
            _merge_splits(O, O_PART, M, L, pid_bh, num_splits, R, HEAD_DIM, BLOCK_R)


@triton.jit
def _merge_splits(
    O, O_PART, M, L, pid_bh, num_splits, R,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """out = sum_s w_s acc_s / sum_s w_s l_s, w_s = 2^(m_s - max m), for the R rows of one
    (batch, KV head), folding the splits in one at a time (running max, as the online softmax).

    A split whose keys are all masked has max -inf and sum 0 and gets weight 0 (no NaN). The
    partials were written by other programs: loads go through L2 (".cg"), not this SM's L1.
    """
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_r < R
    out = tl.zeros([BLOCK_R, HEAD_DIM], tl.float32)
    denom = tl.zeros([BLOCK_R], tl.float32)
    m_run = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in range(num_splits):
        part = (pid_bh * num_splits + s).to(tl.int64) * R + offs_r
        m_s = tl.load(M + part, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
        l_s = tl.load(L + part, mask=row_ok, other=0.0, cache_modifier=".cg")
        acc_s = tl.load(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :],
                        mask=row_ok[:, None], other=0.0, cache_modifier=".cg")  # fmt: skip
        m_new = tl.maximum(m_run, m_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: weights 0
        alpha = tl.exp2(m_run - m_use)
        w = tl.exp2(m_s - m_use)
        out = out * alpha[:, None] + acc_s * w[:, None]
        denom = denom * alpha + l_s * w
        m_run = m_new
    out = out / tl.where(denom > 0, denom, 1.0)[:, None]
    o_row = pid_bh.to(tl.int64) * R + offs_r
    tl.store(O + o_row[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])  # fmt: skip


def supports_head_dim(head_dim: int) -> bool:
    """The kernels take head dims that are powers of two in 16..256."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(
    batch_kv_heads: int, n: int, device: torch.device, block_n: int = BLOCK_N
) -> int:
    """Splits per (batch, KV head) so that about PROGRAMS_PER_SM programs run per SM, with at
    least MIN_KEYS_PER_SPLIT keys each (CUDA), or CPU_SPLITS (elsewhere, to test the splits);
    capped at one BLOCK_N tile per split."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        splits = triton.cdiv(PROGRAMS_PER_SM * _sm_count(index), batch_kv_heads)
        splits = min(splits, triton.cdiv(n, MIN_KEYS_PER_SPLIT))
    else:
        splits = CPU_SPLITS
    return max(1, min(splits, triton.cdiv(n, block_n)))


def split_plan(n: int, num_splits: int, block_n: int) -> tuple[int, int]:
    """(splits, chunk): chunk = keys per split, a multiple of block_n; splits = cdiv(n, chunk)
    <= num_splits, so no split is empty (a request above cdiv(n, block_n) is clamped)."""
    tiles = triton.cdiv(n, block_n)
    chunk = triton.cdiv(tiles, max(1, min(num_splits, tiles))) * block_n
    return triton.cdiv(n, chunk), chunk


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Validate shapes (host-side, shapes only); returns the mask as a (B, >=n) view."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-d, got {tuple(q.shape)}, {k.shape}, {v.shape}")
    B, KVH, _, D = q.shape
    n = k.shape[2]
    if k.shape != (B, KVH, n, D) or v.shape != k.shape:
        raise ValueError(
            f"k, v must be (B, KVH, n, D) = {(B, KVH, n, D)}, got {k.shape}, {v.shape}"
        )
    if not supports_head_dim(D):
        raise ValueError(f"head dim must be a power of two in 16..256, got {D}")
    if n < 1:
        raise ValueError("need at least one key")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if mask.dim() == 4:
        if mask.shape[1] != 1 or mask.shape[2] != 1:
            raise ValueError(f"a 4-d mask must be (B, 1, 1, n), got {tuple(mask.shape)}")
        mask = mask[:, 0, 0]
    if mask.dim() != 2 or mask.shape[0] != B or mask.shape[1] < n or not mask.is_floating_point():
        raise ValueError(
            f"mask must be additive float (B, n) = {(B, n)}, got {mask.shape} {mask.dtype}"
        )
    return mask


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float | None = None,
    num_splits: int | None = None,
    *,
    last_key: torch.Tensor | None = None,
    new_k: torch.Tensor | None = None,
    new_v: torch.Tensor | None = None,
    block_n: int = BLOCK_N,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for every row of q; (B, KVH, R, D) in q's dtype.

    Shapes in the module docstring. num_splits: key chunks per (batch, KV head), default
    ``default_num_splits``; clamped to cdiv(n, block_n). block_n (keys per tile, a power of
    two >= 16), num_warps and num_stages are the kernels' tuning knobs. last_key: see the
    module docstring. new_k, new_v (B, KVH, 1, D), with last_key: the step's key and value,
    written into k and v at index last_key (< n) by the same launch and attended to, so a
    decode step needs no separate cache write. The work runs in the operators
    ``torch.ops.mtrl.decode_attention`` / ``decode_attention_append`` (the latter mutates k
    and v), so ``torch.compile`` traces a model through this call (no graph break).
    """
    if new_k is None and new_v is None:
        return _decode_attention_op(
            q, k, v, mask, last_key, scale, num_splits, block_n, num_warps, num_stages
        )
    if new_k is None or new_v is None or last_key is None:
        raise ValueError("new_k and new_v go together, and need last_key (where they are written)")
    return _decode_attention_append_op(
        q, k, v, mask, last_key, new_k, new_v, scale, num_splits, block_n, num_warps, num_stages
    )


def _launch(
    q, k, v, mask, last_key, new_k, new_v, scale, num_splits, block_n, num_warps, num_stages
):
    """Validate, plan the splits and run the kernels (shared by both operators)."""
    mask = _check(q, k, v, mask)
    if last_key is not None and (
        last_key.numel() != 1 or last_key.is_floating_point() or last_key.device != q.device
    ):
        raise ValueError(
            f"last_key must be a one-element integer tensor on {q.device}, got "
            f"{tuple(last_key.shape)} {last_key.dtype} on {last_key.device}"
        )
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    B, KVH, R, D = q.shape
    n = k.shape[2]
    append = new_k is not None
    if append:
        for name, t, cache in (("new_k", new_k, k), ("new_v", new_v, v)):
            if t.shape != (B, KVH, 1, D) or t.dtype != cache.dtype:
                raise ValueError(
                    f"{name} must be {(B, KVH, 1, D)} {cache.dtype}, got {tuple(t.shape)} {t.dtype}"
                )
        if k.stride(-1) != 1 or v.stride(-1) != 1:
            raise ValueError(
                "appending needs k and v with a contiguous last dim (written in place)"
            )
        new_k, new_v = (t if t.stride(-1) == 1 else t.contiguous() for t in (new_k, new_v))
    # The kernels index the head dim with unit stride; other layouts are copied.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if num_splits is None:
        num_splits = default_num_splits(B * KVH, n, q.device, block_n)
    splits, chunk = split_plan(n, num_splits, block_n)
    block_r = max(16, triton.next_power_of_2(R))

    out = torch.empty(B, KVH, R, D, device=q.device, dtype=q.dtype)
    if splits == 1:
        o_part, m, l, arrived = out, out, out, out  # unused when FINAL
    else:
        o_part = torch.empty(B * KVH, splits, R, D, device=q.device, dtype=torch.float32)
        m = torch.empty(B * KVH, splits, R, device=q.device, dtype=torch.float32)
        l = torch.empty_like(m)
        arrived = arrival_counters(q.device, B * KVH, "decode_attention")
    if not append:
        new_k = new_v = q  # unused pointers and strides
    _split_kv_kernel[(B * KVH, splits)](
        q, k, v, mask, mask if last_key is None else last_key, new_k, new_v,
        out, o_part, m, l, arrived,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mask.stride(),
        *new_k.stride()[:2], *new_v.stride()[:2],
        KVH, R, n, chunk, scale * LOG2E,
        HEAD_DIM=D, BLOCK_R=block_r, BLOCK_N=block_n, FINAL=splits == 1,
        HAS_LAST_KEY=last_key is not None, APPEND=append,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


@torch.library.custom_op("mtrl::decode_attention", mutates_args=())
def _decode_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    last_key: torch.Tensor | None,
    scale: float | None,
    num_splits: int | None,
    block_n: int,
    num_warps: int,
    num_stages: int,
) -> torch.Tensor:
    return _launch(
        q, k, v, mask, last_key, None, None, scale, num_splits, block_n, num_warps, num_stages
    )


@_decode_attention_op.register_fake
def _(q, k, v, mask, last_key, scale, num_splits, block_n, num_warps, num_stages):
    _check(q, k, v, mask)
    return q.new_empty(q.shape)


@torch.library.custom_op("mtrl::decode_attention_append", mutates_args=("k", "v"))
def _decode_attention_append_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    last_key: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    scale: float | None,
    num_splits: int | None,
    block_n: int,
    num_warps: int,
    num_stages: int,
) -> torch.Tensor:
    return _launch(
        q, k, v, mask, last_key, new_k, new_v, scale, num_splits, block_n, num_warps, num_stages
    )


@_decode_attention_append_op.register_fake
def _(q, k, v, mask, last_key, new_k, new_v, scale, num_splits, block_n, num_warps, num_stages):
    _check(q, k, v, mask)
    return q.new_empty(q.shape)


def decode_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain PyTorch softmax(q k^T * scale + mask) v in fp32; (B, KVH, R, D) fp32."""
    mask = _check(q, k, v, mask)
    n = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = q.float() @ k.float().transpose(-1, -2) * scale + mask[:, None, None, :n].float()
    return torch.softmax(scores, dim=-1) @ v.float()
