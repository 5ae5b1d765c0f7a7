"""Launchers for our Triton kernels. Shapes are documented per function."""

from __future__ import annotations

import os

import torch
import triton

from .attention import _block_sparse_attn_fwd
from .attention_bwd import _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_dq
from .scoring import _key_importance_kernel, _last_block_lse_kernel, _permute_rows_kernel
from .selection import _compact_kept_kernel, _mark_kept_kernel, _select_blocks_kernel

LOG2E = 1.4426950408889634


# triton.jit picks interpreted or compiled kernels when they are defined (at this import), so
# the mode is read once, here, and not from the environment at call time.
_INTERPRET = triton.knobs.runtime.interpret

try:  # Gluon (Triton's tile-level language, for the Hopper kernels) came with Triton 3.5
    from . import attention_bwd_sm90, attention_sm90
except ImportError:
    attention_sm90 = attention_bwd_sm90 = None

KERNELS = ("auto", "sm90", "generic")


def interpreting() -> bool:
    """True when our kernels were defined under Triton's interpreter (TRITON_INTERPRET=1)."""
    return _INTERPRET


def available(t: torch.Tensor) -> bool:
    """Whether our Triton kernels can run on the device of ``t``."""
    return t.is_cuda or (interpreting() and t.device.type == "cpu")


def _qk_block(head_dim: int, rows: int) -> int:
    """Tile rows for the scoring kernels: small on the interpreter, 64 on the GPU."""
    return max(16, min(64, triton.next_power_of_2(rows)))


def key_importance(q: torch.Tensor, k: torch.Tensor, rows: int, scale: float) -> torch.Tensor:
    """Mean softmax attention of the last ``rows`` queries of every head of a group onto keys.

    q: (B, HQ, N, D); k: (B, HKV, N, D). Returns (B, HKV, N) fp32.
    """
    B, HQ, N, D = q.shape
    HKV = k.shape[1]
    G = HQ // HKV
    chunk = 1024 if q.is_cuda else 64 * triton.cdiv(N, 64 * 2)
    n_chunks = triton.cdiv(N, chunk)
    # Tiles from a sweep on an H100 (128K: 1.23 -> 1.15 ms); the interpreter wants small ones.
    bq = 128 if q.is_cuda else _qk_block(D, G * rows)
    bk = 64 if q.is_cuda else 32
    m = torch.empty(B * HKV, G * rows, n_chunks, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    s2 = scale * LOG2E
    grid = (triton.cdiv(G * rows, bq), B * HKV, n_chunks)
    _last_block_lse_kernel[grid](
        q, k, m, l, *q.stride()[:3], *k.stride()[:3], N, rows, chunk, s2,
        G=G, HKV=HKV, HEAD_DIM=D, BLOCK_Q=bq, BLOCK_K=bk,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    mx = m.amax(-1, keepdim=True)
    lse = (torch.log2((l * torch.exp2(m - mx)).sum(-1)) + mx.squeeze(-1)).contiguous()
    imp = torch.empty(B, HKV, N, device=q.device, dtype=torch.float32)
    bq2 = 64 if q.is_cuda else bq
    _key_importance_kernel[(triton.cdiv(N, bk), B * HKV)](
        q, k, lse, imp, *q.stride()[:3], *k.stride()[:3], N, rows, s2, 1.0 / (G * rows),
        G=G, HKV=HKV, HEAD_DIM=D, BLOCK_Q=bq2, BLOCK_K=bk, num_warps=4, num_stages=2,
    )  # fmt: skip
    return imp


def permute_rows(
    k: torch.Tensor, v: torch.Tensor, perm: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor
) -> None:
    """kp[..., i, :] = k[..., perm[i], :] and the same for v. perm: (B, HKV, N) int32.

    kp, vp: (B, HKV, >=N, D) outputs with identical strides (views of one buffer are fine).
    """
    B, HKV, N, D = k.shape
    assert kp.stride() == vp.stride()
    block = 64
    _permute_rows_kernel[(triton.cdiv(N, block), B * HKV)](
        k, v, perm, kp, vp, *k.stride()[:3], *v.stride()[:3], *perm.stride(), *kp.stride()[:3],
        N, HKV=HKV, HEAD_DIM=D, BLOCK=block, num_warps=4,
    )  # fmt: skip


def select_blocks(
    logits: torch.Tensor, sink: torch.Tensor, threshold: float, blocks_per_seg: int, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept key blocks per query block. logits: (B, HQ, n_qb, n_kb) fp32 pooled scores in
    log2 units; sink: (B, HKV) int32. Returns counts (B, HQ, n_qb) int32 and
    indices (B, HQ, n_qb, n_kb) int32 (first ``counts`` entries valid, ascending)."""
    B, HQ, n_qb, n_kb = logits.shape
    counts = torch.empty(B, HQ, n_qb, device=logits.device, dtype=torch.int32)
    idx = torch.empty(B, HQ, n_qb, n_kb, device=logits.device, dtype=torch.int32)
    block_kb = max(16, triton.next_power_of_2(n_kb))
    _select_blocks_kernel[(n_qb, B * HQ)](
        logits, sink, counts, idx, n_kb, float(threshold),
        HQ=HQ, G=groups, BLOCKS_PER_SEG=blocks_per_seg, BLOCK_KB=block_kb,
        num_warps=4 if block_kb <= 1024 else 8,
    )  # fmt: skip
    return counts, idx


def _attn_configs() -> list[triton.Config]:
    out = []
    for bm, bn, w, s in [
        (128, 128, 8, 3),  # the best on H200 at 32K-128K, d=128 (bench/results/pbs.md)
        (128, 128, 8, 2),
        (128, 64, 8, 3),
        (128, 64, 4, 3),
        (128, 32, 4, 3),
        (64, 64, 4, 3),
        (64, 32, 4, 4),
    ]:
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    return out


def _prune(configs, named_args, **kwargs):
    block = kwargs.get("BLOCK", named_args.get("BLOCK"))
    d = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    keep = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        # Query tiles must not straddle a selection block; key tiles split a block evenly.
        if block % bm or block % bn or bn > bm:
            continue
        if d <= 64 and bn < 64:  # small head dim: wide key tiles pay off
            continue
        keep.append(c)
    return keep or [triton.Config({"BLOCK_M": block, "BLOCK_N": block}, num_warps=4)]


_block_sparse_attn_tuned = triton.autotune(
    configs=_attn_configs(),
    key=["N_BUCKET", "HQ", "G", "HEAD_DIM", "BLOCK", "SEG", "STORE_LSE"],
    prune_configs_by={"early_config_prune": _prune},
)(_block_sparse_attn_fwd)


def _tiles_split_blocks(configs, named_args, **kwargs):
    """Backward tiles: query and key tiles split a selection block evenly."""
    block = kwargs.get("BLOCK", named_args.get("BLOCK"))
    keep = [c for c in configs if block % c.kwargs["BLOCK_M"] == 0 == block % c.kwargs["BLOCK_N"]]
    return keep or [triton.Config({"BLOCK_M": block, "BLOCK_N": block}, num_warps=4)]


def _bwd_tuned(kernel, shapes, reset_to_zero=None):
    """``kernel`` autotuned over (BLOCK_M, BLOCK_N, warps, stages) ``shapes``; the buffers it
    adds into are named in ``reset_to_zero`` (zeroed before each timed run)."""
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in shapes
    ]
    return triton.autotune(
        configs=configs,
        key=["N_BUCKET", "HQ", "G", "HEAD_DIM", "BLOCK", "SEG"],
        prune_configs_by={"early_config_prune": _tiles_split_blocks},
        reset_to_zero=reset_to_zero,
    )(kernel)


# The fastest tiles of a sweep on an H100 (32 q / 8 KV heads, head dim 128, bf16, ~25% density,
# 32K and 128K; bench/results/pbs_backward.md), each list best first. dq at 128K: 93 ms for
# 128 x 64 or 128 x 128 with 8 warps. dk/dv at 128K: 161 ms for 64 queries x 128 keys with 8
# warps, 170 ms for 128 x 128; 4 warps on 128 keys was 4x slower (the two fp32 accumulators
# do not fit their registers), so it is not a candidate.
_attn_bwd_dq_tuned = _bwd_tuned(
    _attn_bwd_dq, [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 2)]
)
_attn_bwd_dkdv_tuned = _bwd_tuned(
    _attn_bwd_dkdv,
    [(64, 128, 8, 2), (128, 128, 8, 2), (32, 128, 8, 3), (64, 64, 4, 2)],
    reset_to_zero=["DK", "DV"],
)


def _autotune(q: torch.Tensor) -> bool:
    """Autotune attention tiles: on a GPU, unless PBS_AUTOTUNE=0 (tests: one fixed shape)."""
    return q.is_cuda and not interpreting() and os.environ.get("PBS_AUTOTUNE", "1") != "0"


def attention_kernel(q: torch.Tensor, block: int, kernel: str = "auto") -> str:
    """Which attention kernel runs q (B, HQ, N, D): "sm90" (Gluon, TMA and async wgmma; Hopper
    GPUs, bf16/fp16, head dim 64/128, block 128) or "generic" (any GPU, the interpreter).
    ``kernel="auto"`` picks sm90 wherever it runs; naming one that cannot run is an error."""
    if kernel not in KERNELS:
        raise ValueError(f"pbs: kernel must be one of {KERNELS}, got {kernel!r}")
    sm90 = attention_sm90 is not None and not interpreting() and attention_sm90.supported(q, block)
    if kernel == "sm90" and not sm90:
        raise ValueError(
            "pbs: kernel='sm90' needs an sm_90 GPU, Triton with Gluon, bf16/fp16, head dim 64 "
            f"or 128 and block 128; got {q.device} {q.dtype}, head dim {q.shape[-1]}, "
            f"block {block}"
        )
    return "sm90" if kernel == "sm90" or (kernel == "auto" and sm90) else "generic"


def block_sparse_attention(
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
    out: torch.Tensor | None = None,
    kernel: str = "auto",
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of q over its own segment (exact) and the listed blocks of kp/vp.

    q: (B, HQ, N, D); k, v, kp, vp: (B, HKV, N, D) (kp/vp may be longer); counts, idx from
    :func:`select_blocks`; ``kernel`` as in :func:`attention_kernel`. Returns (B, HQ, N, D) in
    q's dtype (or fills ``out``). ``lse``: an optional contiguous (B, HQ, N) fp32 tensor that
    receives each row's log2-sum-exp (qk scale included) for the backward.
    """
    B, HQ, N, D = q.shape
    o = torch.empty_like(q) if out is None else out
    if attention_kernel(q, block, kernel) == "sm90":
        return attention_sm90.block_sparse_attention_sm90(
            q, k, v, kp, vp, counts, idx, block, seg, scale, o, lse
        )
    G = HQ // k.shape[1]
    n_qb, n_kb = idx.shape[2], idx.shape[3]
    args = (
        q, k, v, kp, vp, o, lse, counts, idx,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *kp.stride()[:3], *vp.stride()[:3], *o.stride()[:3],
        N, n_qb, n_kb, scale * LOG2E, triton.next_power_of_2(N),
    )  # fmt: skip
    meta = dict(HQ=HQ, G=G, HEAD_DIM=D, BLOCK=block, SEG=seg, STORE_LSE=lse is not None)
    if _autotune(q):

        def grid(m):
            return (triton.cdiv(N, m["BLOCK_M"]), B * HQ)

        _block_sparse_attn_tuned[grid](*args, **meta)
    else:  # interpreter, or PBS_AUTOTUNE=0 (tests): one fixed, always valid tile shape
        bm = min(block, 64 if interpreting() else 128)
        bn = min(block, 32 if interpreting() else 64)
        _block_sparse_attn_fwd[(triton.cdiv(N, bm), B * HQ)](
            *args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=4 if bm < 128 else 8
        )
    return o


def key_block_lists(
    counts: torch.Tensor, idx: torch.Tensor, n_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block lists transposed: per (batch, KV head, key block), the query blocks that kept it.

    counts (B, HQ, n_qb), idx (B, HQ, n_qb, n_kb) as from :func:`select_blocks`. Returns
    tcounts (B, HKV, n_kb) int32 and tidx (B, HKV, n_kb, G*n_qb) int32 whose first tcounts
    entries are ``g * n_qb + qb`` (g: query head within the group), ascending; the entries
    after them are unspecified. :func:`pbs.select.key_block_lists_torch` is the reference.
    """
    B, HQ, n_qb, n_kb = idx.shape
    G = HQ // n_kv_heads
    width = G * n_qb
    counts, idx = counts.contiguous(), idx.contiguous()
    kept = torch.zeros(B, n_kv_heads, n_kb, width, device=idx.device, dtype=torch.int8)
    block_kb = 64 if interpreting() else 1024
    _mark_kept_kernel[(n_qb, B * HQ)](
        counts, idx, kept, n_qb, n_kb, G=G, BLOCK_KB=min(block_kb, triton.next_power_of_2(n_kb))
    )
    tcounts = torch.empty(B, n_kv_heads, n_kb, device=idx.device, dtype=torch.int32)
    tidx = torch.empty(B, n_kv_heads, n_kb, width, device=idx.device, dtype=torch.int32)
    chunk = min(64 if interpreting() else 4096, triton.next_power_of_2(width))
    _compact_kept_kernel[(B * n_kv_heads * n_kb,)](
        kept, tcounts, tidx, width, CHUNK=chunk, num_warps=4 if chunk <= 1024 else 8
    )
    return tcounts, tidx


# Query blocks per region of a backward work item (see work_items). On an H100 at 128K
# (bench/results/pbs_backward.md) 16 took 199-200 ms, 32 and 64 both 192-193; at 32K all
# three took 13.1-14.5 ms, their spread from run to run.
REGION = 32


def work_items(
    tcounts: torch.Tensor,
    tidx: torch.Tensor,
    n_qb: int,
    block: int,
    seg: int,
    region: int,
) -> torch.Tensor:
    """The backward's work, in launch order: (n_items, 2 + 2G) int32 rows (row, own,
    lo_0 .. lo_G-1, hi_0 .. hi_G-1). An item is key block ``row`` of tcounts (B, HKV, n_kb)
    (= (batch * HKV + KV head) * n_kb + key block) over one region of ``region`` query blocks:
    the entries [lo_g, hi_g) of its tidx row (B, HKV, n_kb, G * n_qb) are the region's query
    blocks of head g that kept it; own = 1 for the one item whose region holds the block's
    segment, which also walks the own segment. Items are ordered by (batch and KV head, region,
    key block), so the key blocks that share a region's Q, dO and dq tiles run together while
    those tiles are in L2. Empty items are left out (one host sync for their number)."""
    B, HKV, n_kb = tcounts.shape
    rows, width = B * HKV * n_kb, tidx.shape[-1]
    G = width // n_qb
    dev = tcounts.device
    valid = torch.arange(width, device=dev) < tcounts.view(rows, 1)
    entries = torch.where(valid, tidx.view(rows, width), width)  # sorted, padded past all
    n_reg = triton.cdiv(n_qb, region)
    edges = (torch.arange(n_reg + 1, device=dev) * region).clamp(max=n_qb)
    bounds = (torch.arange(G, device=dev)[:, None] * n_qb + edges).flatten()
    pos = torch.searchsorted(entries, bounds.expand(rows, -1).contiguous(), out_int32=True)
    pos = pos.view(rows, G, n_reg + 1)
    lo, hi = pos[..., :-1], pos[..., 1:]
    own_qb = torch.arange(n_kb, device=dev) * block // seg * seg // block
    own = torch.zeros(rows, n_reg, device=dev, dtype=torch.bool)
    own[torch.arange(rows, device=dev), (own_qb // region).repeat(B * HKV)] = True
    keep = (hi > lo).any(1) | own
    bh, c, kb = keep.view(B * HKV, n_kb, n_reg).transpose(1, 2).nonzero(as_tuple=True)
    row = bh * n_kb + kb
    cols = [row[:, None], own[row, c][:, None], lo[row, :, c], hi[row, :, c]]
    return torch.cat([x.int() for x in cols], 1).contiguous()


def block_sparse_attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kp: torch.Tensor,
    vp: torch.Tensor,
    perm: torch.Tensor,
    counts: torch.Tensor,
    idx: torch.Tensor,
    block: int,
    seg: int,
    scale: float,
    kernel: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`block_sparse_attention` (either kernel) for output gradient ``do``.

    do, q, out: (B, HQ, N, D); k, v, kp, vp, perm, counts, idx as in the forward (perm:
    (B, HKV, N) int32, kp[..., i, :] = k[..., perm[i], :]); lse: (B, HQ, N) fp32 written by the
    forward. ``kernel`` as in :func:`attention_kernel`: "sm90" computes dq, dk, dv in one
    Gluon kernel (:mod:`pbs.kernels.attention_bwd_sm90`), "generic" with the portable dq and
    dk/dv kernels of :mod:`pbs.kernels.attention_bwd`. Returns dq (B, HQ, N, D) and dk, dv
    (B, HKV, N, D) in original key order, each in its input's dtype.
    """
    sm90 = attention_kernel(q, block, kernel) == "sm90"
    B, HQ, N, D = q.shape
    HKV = k.shape[1]
    G = HQ // HKV
    n_qb, n_kb = idx.shape[2], idx.shape[3]
    qk_scale = scale * LOG2E
    delta = torch.empty(B, HQ, N, device=q.device, dtype=torch.float32)
    bm = 64 if interpreting() else 128
    _attn_bwd_delta[(triton.cdiv(N, bm), B * HQ)](
        out, do, delta, *out.stride()[:3], *do.stride()[:3], N,
        HQ=HQ, HEAD_DIM=D, BLOCK_M=bm, num_warps=4,
    )  # fmt: skip
    lse = lse.contiguous()
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    tcounts, tidx = key_block_lists(counts, idx, HKV)
    items = work_items(tcounts, tidx, n_qb, block, seg, REGION)
    # A key block's items add their dk, dv here, then one cast.
    dk_acc = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    dv_acc = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    if sm90:
        attention_bwd_sm90.block_sparse_backward_sm90(
            q, do, kp, vp, lse, delta, perm, tidx, items, n_qb, block, seg, scale,
            dq, dk_acc, dv_acc,
        )  # fmt: skip
        return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype)
    dq_args = (
        q, k, v, kp, vp, do, dq, lse, delta, counts, idx,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *kp.stride()[:3], *vp.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
        N, n_qb, n_kb, qk_scale, scale, triton.next_power_of_2(N),
    )  # fmt: skip
    dkdv_args = (
        q, kp, vp, do, dk_acc, dv_acc, lse, delta, perm, tidx, items,
        *q.stride()[:3], *kp.stride()[:3], *vp.stride()[:3], *do.stride()[:3],
        *perm.stride(), *dk_acc.stride()[:3],
        N, n_qb, n_kb, qk_scale, scale, triton.next_power_of_2(N),
    )  # fmt: skip
    meta = dict(HQ=HQ, G=G, HEAD_DIM=D, BLOCK=block, SEG=seg)
    if _autotune(q):
        _attn_bwd_dq_tuned[lambda m: (triton.cdiv(N, m["BLOCK_M"]), B * HQ)](*dq_args, **meta)
        _attn_bwd_dkdv_tuned[lambda m: (block // m["BLOCK_N"], len(items))](*dkdv_args, **meta)
    else:  # interpreter (small tiles keep it fast), or PBS_AUTOTUNE=0: one fixed shape each
        bm, bn = min(block, 32 if interpreting() else 128), min(block, 32)
        _attn_bwd_dq[(triton.cdiv(N, bm), B * HQ)](
            *dq_args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=4 if bm < 128 else 8
        )
        bm, bn = min(block, 32 if interpreting() else 64), min(block, 32 if interpreting() else 128)
        _attn_bwd_dkdv[(block // bn, len(items))](
            *dkdv_args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=4 if bn < 128 else 8
        )
    return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype)


__all__ = [
    "KERNELS",
    "attention_kernel",
    "available",
    "block_sparse_attention",
    "block_sparse_attention_backward",
    "interpreting",
    "key_block_lists",
    "key_importance",
    "permute_rows",
    "select_blocks",
    "work_items",
]
