"""Step 2 of PBS-Attn: choose, per query block, which key blocks of earlier segments to keep.

Block scores come from mean-pooled queries against mean-pooled permuted keys, softmaxed over
the candidate blocks (all key blocks of earlier segments; the own segment is always computed
exactly). A query block keeps the smallest set of candidates whose mass reaches ``threshold``,
plus the block holding token 0 (the attention sink) when ``force_sink``. The result is a list
of kept key blocks per (batch, query head, query block): the kernel visits only those.
"""

from __future__ import annotations

import torch

from . import kernels
from .kernels import LOG2E


def mean_pool(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean over blocks of ``block_size`` tokens (the last may be partial).

    x: (B, H, N, D) -> (B, H, cdiv(N, block_size), D) fp32. The reduction accumulates in fp32
    while reading ``x`` in its own dtype: an fp32 copy of q would cost more than the rest of
    the selection (2.3 of 3.3 ms at 128K on an H100).
    """
    N = x.shape[2]
    n_full = N // block_size
    parts = []
    if n_full:
        full = x[:, :, : n_full * block_size].unflatten(2, (n_full, block_size))
        parts.append(full.mean(3, dtype=torch.float32))
    if N % block_size:
        parts.append(x[:, :, n_full * block_size :].mean(2, keepdim=True, dtype=torch.float32))
    return torch.cat(parts, 2) if len(parts) > 1 else parts[0]


def block_logits(q: torch.Tensor, kp: torch.Tensor, block_size: int, scale: float):
    """Pooled block scores in log2 units: (B, HQ, n_qb, n_kb) fp32 — the only (N/block)^2
    float tensor of the method. q: (B, HQ, N, D); kp: (B, HKV, N, D) permuted keys."""
    B, HQ = q.shape[:2]
    HKV = kp.shape[1]
    qp = mean_pool(q, block_size) * (scale * LOG2E)  # scaling (N/block, D) beats (N/block)^2
    kpool = mean_pool(kp, block_size)
    n_qb = qp.shape[2]
    # GQA: query heads hkv*G .. hkv*G+G-1 share KV head hkv; fold them into the row dim.
    s = qp.reshape(B, HKV, -1, qp.shape[-1]) @ kpool.transpose(-1, -2)
    return s.reshape(B, HQ, n_qb, -1)


def sink_block(perm: torch.Tensor, block_size: int, segment_size: int) -> torch.Tensor:
    """Permuted block that holds token 0, per (batch, KV head). perm: (B, HKV, N).

    Returns (B, HKV) int32. Token 0 lives in segment 0, so only that segment is searched.
    """
    first = perm[..., :segment_size]
    return (first == 0).int().argmax(-1).div(block_size, rounding_mode="floor").int()


def select_blocks_torch(logits, sink, threshold, blocks_per_seg, groups):
    """Plain PyTorch twin of :func:`pbs.kernels.select_blocks` (same outputs, by sorting)."""
    B, HQ, n_qb, n_kb = logits.shape
    dev = logits.device
    n_cand = (torch.arange(n_qb, device=dev) // blocks_per_seg) * blocks_per_seg
    cand = torch.arange(n_kb, device=dev)[None, :] < n_cand[:, None]  # (n_qb, n_kb)
    s = logits.masked_fill(~cand, float("-inf"))
    m = s.amax(-1, keepdim=True).nan_to_num(0.0, neginf=0.0)
    p = torch.where(cand, torch.exp2(s - m), 0.0)
    if threshold >= 1.0:
        keep = cand.expand_as(p).clone()
    else:
        sorted_p, _ = p.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p
        target = threshold * p.sum(-1, keepdim=True)
        k = (before < target).sum(-1, keepdim=True).clamp(min=1)
        cut = sorted_p.gather(-1, k - 1)
        keep = cand & (p >= cut)
    sink_hq = sink.repeat_interleave(groups, dim=1)[..., None, None]
    keep |= cand & (torch.arange(n_kb, device=dev) == sink_hq)
    counts = keep.sum(-1).int()
    order = (~keep).to(torch.int8).argsort(dim=-1, stable=True).int()
    idx = torch.where(torch.arange(n_kb, device=dev) < counts[..., None], order, 0)
    return counts, idx


def key_block_lists_torch(counts, idx, n_kv_heads):
    """Plain PyTorch twin of :func:`pbs.kernels.key_block_lists` (same outputs; here the
    entries after the first tcounts of a row are 0)."""
    B, HQ, n_qb, n_kb = idx.shape
    G = HQ // n_kv_heads
    slot = torch.arange(n_kb, device=idx.device)
    kept = torch.zeros(B, HQ, n_qb, n_kb + 1, device=idx.device, dtype=torch.bool)
    kept.scatter_(-1, torch.where(slot < counts[..., None], idx.long(), n_kb), True)
    # (B, HKV, G, n_qb, n_kb) -> (B, HKV, n_kb, G * n_qb): one row per key block
    kept_t = kept[..., :n_kb].reshape(B, n_kv_heads, G * n_qb, n_kb).transpose(-1, -2)
    tcounts = kept_t.sum(-1, dtype=torch.int32)
    pos = kept_t.cumsum(-1) - 1
    width = G * n_qb
    tidx = torch.zeros(B, n_kv_heads, n_kb, width + 1, device=idx.device, dtype=torch.int32)
    entries = torch.arange(width, device=idx.device, dtype=torch.int32).expand_as(pos)
    tidx.scatter_(-1, torch.where(kept_t, pos, width), entries)
    return tcounts.contiguous(), tidx[..., :width].contiguous()


def select_blocks(logits, sink, threshold, blocks_per_seg, groups):
    """Kept key blocks as lists. logits: (B, HQ, n_qb, n_kb) log2-unit scores; sink: (B, HKV)
    int32 (negative disables). Returns counts (B, HQ, n_qb) int32 and indices
    (B, HQ, n_qb, n_kb) int32 whose first ``counts`` entries are the kept blocks, ascending."""
    if kernels.available(logits):
        return kernels.select_blocks(logits, sink, threshold, blocks_per_seg, groups)
    return select_blocks_torch(logits, sink, threshold, blocks_per_seg, groups)
