"""Step 1 of PBS-Attn: score keys and permute them inside segments.

Keys (and values with them) are sorted by importance inside every full segment of
``segment_size`` tokens; the incomplete tail segment stays in place. Queries are not permuted.
Because segments keep their order, every key of an earlier segment still precedes every query
of a later segment, so attention to earlier segments is order-free and causality survives.
"""

from __future__ import annotations

import torch

from . import kernels


def key_importance_torch(q: torch.Tensor, k: torch.Tensor, rows: int, scale: float):
    """Plain PyTorch twin of :func:`pbs.kernels.key_importance` (materialises the logits).

    q: (B, HQ, N, D); k: (B, HKV, N, D). Returns (B, HKV, N) fp32.
    """
    B, HQ, N, D = q.shape
    HKV = k.shape[1]
    G = HQ // HKV
    ql = q[:, :, N - rows :].float().reshape(B, HKV, G * rows, D)
    logits = ql @ k.float().transpose(-1, -2) * scale
    pos = torch.arange(N - rows, N, device=q.device).repeat(G)
    causal = torch.arange(N, device=q.device)[None, :] <= pos[:, None]
    logits = logits.masked_fill(~causal, float("-inf"))
    return logits.softmax(-1).mean(-2)


def key_importance(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float):
    """Importance of every key for the last query block (softmax, averaged over its queries
    and the query heads of each KV head). Returns (B, HKV, N) fp32."""
    rows = min(block_size, q.shape[2])
    if kernels.available(q):
        return kernels.key_importance(q, k, rows, scale)
    return key_importance_torch(q, k, rows, scale)


def segment_permutation(importance: torch.Tensor, segment_size: int) -> torch.Tensor:
    """Per KV head, source index of every permuted position. importance: (B, HKV, N).

    Full segments are sorted by descending importance; the tail keeps its order.
    Returns (B, HKV, N) int32 with perm[..., i] in the same segment as i.
    """
    B, H, N = importance.shape
    n_full = (N // segment_size) * segment_size
    perm = torch.empty(B, H, N, device=importance.device, dtype=torch.int32)
    if n_full:
        seg = importance[..., :n_full].unflatten(-1, (-1, segment_size))
        order = seg.argsort(dim=-1, descending=True, stable=True)
        base = torch.arange(0, n_full, segment_size, device=importance.device)[:, None]
        perm[..., :n_full] = (order + base).flatten(-2)
    perm[..., n_full:] = torch.arange(n_full, N, device=importance.device, dtype=torch.int32)
    return perm


def identity_permutation(k: torch.Tensor) -> torch.Tensor:
    """perm for ``permute=False``: every key stays where it is. Returns (B, HKV, N) int32."""
    B, H, N, _ = k.shape
    return torch.arange(N, device=k.device, dtype=torch.int32).expand(B, H, N)


def permute_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    perm: torch.Tensor,
    kp: torch.Tensor | None = None,
    vp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather K and V in permuted order. k, v: (B, HKV, N, D); perm: (B, HKV, N) int32.

    kp, vp: optional outputs (B, HKV, >=N, D) with equal strides (e.g. views of one buffer).
    With gradients wanted, the differentiable torch gather is used instead of the kernel.
    Returns (kp, vp), each (B, HKV, N, D) or the given buffers.
    """
    if kp is None:
        kp = torch.empty(k.shape, device=k.device, dtype=k.dtype)
        vp = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    needs_grad = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
    if kernels.available(k) and k.stride(-1) == 1 and v.stride(-1) == 1 and not needs_grad:
        kernels.permute_rows(k, v, perm, kp, vp)
    else:
        N = k.shape[2]
        idx = perm.long()[..., None].expand(*perm.shape, k.shape[-1])
        kp[:, :, :N] = k.gather(2, idx)
        vp[:, :, :N] = v.gather(2, idx)
    return kp, vp
