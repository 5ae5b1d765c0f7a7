"""The public entry point: plan (score, permute, select) then attend with a backend."""

from __future__ import annotations

import torch

from . import flex, kernels
from .config import PBSConfig
from .plan import Plan, Timer, check_inputs, dense_attention, density, make_plan, resolve_scale
from .reference import attend_plan


class BlockSparseAttention(torch.autograd.Function):
    """The triton backend's attention over a plan, differentiable in q, k and v.

    The plan (permutation and block lists) is a constant: selection has no gradient. The
    forward keeps each row's log-sum-exp; the backward runs our backward kernels over the same
    block lists and returns dk, dv in the original key order.
    """

    @staticmethod
    def forward(ctx, q, k, v, plan: Plan, kernel: str = "auto"):
        lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
        out = kernels.block_sparse_attention(
            q, k, v, plan.kp, plan.vp, plan.counts, plan.indices,
            plan.block_size, plan.segment_size, plan.scale, kernel=kernel, lse=lse,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, plan.kp, plan.vp, plan.perm, plan.counts,
                              plan.indices)  # fmt: skip
        ctx.blocks = (plan.block_size, plan.segment_size, plan.scale, kernel)
        return out

    @staticmethod
    def backward(ctx, do):
        dq, dk, dv = kernels.block_sparse_attention_backward(do, *ctx.saved_tensors, *ctx.blocks)
        return dq, dk, dv, None, None


def pbs_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: PBSConfig | None = None,
    return_stats: bool = False,
    timing: bool = False,
):
    """Causal prefill attention with permuted block sparsity.

    q: (B, HQ, N, D); k, v: (B, HKV, N, D), HQ a multiple of HKV. Returns (B, HQ, N, D) in q's
    dtype, laid out and scaled like SDPA(is_causal=True, enable_gqa=True); with
    ``return_stats`` also a dict: path, backend, density, kept/causal blocks, the attention
    kernel of the triton backend ("sm90" or "generic", see :func:`pbs.kernels.attention_kernel`)
    and, when ``timing``, the time split score_permute_ms / select_ms / attention_ms.
    Differentiable in q, k, v: the triton backend through :class:`BlockSparseAttention` (our
    backward kernels), flex through FlexAttention's backward; the selection is not
    differentiated.
    """
    config = config or PBSConfig()
    check_inputs(q, k, v)
    N = q.shape[2]
    scale = resolve_scale(config, q.shape[-1])
    timer = Timer(q.device, timing)
    if N < config.min_seq_len:
        out = dense_attention(q, k, v, scale)
        timer.mark("attention")
        stats = {"path": "dense", "backend": "sdpa", "density": 1.0, **timer.result()}
        return (out, stats) if return_stats else out
    backend = config.backend
    if backend == "flex":
        out, plan = flex.pbs_flex_attention(q, k, v, config, timer)
    else:
        with torch.no_grad():  # selection has no gradient
            plan = make_plan(q, k, v, config, timer=timer)
        if kernels.available(q):
            kernel = kernels.attention_kernel(q, config.block_size)
            if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
                out = BlockSparseAttention.apply(q, k, v, plan, kernel)
            else:
                out = kernels.block_sparse_attention(
                    q, k, v, plan.kp, plan.vp, plan.counts, plan.indices,
                    config.block_size, config.segment_size, scale, kernel=kernel,
                )  # fmt: skip
        else:  # no Triton here (CPU without the interpreter): same result, dense masked
            out, backend = attend_plan(q, k, v, plan), "torch"
        timer.mark("attention")
    if not return_stats:
        return out
    d, kept, causal = density(plan)
    stats = {"path": "sparse", "backend": backend, "density": d, "kept_blocks": kept,
             "causal_blocks": causal, **timer.result()}  # fmt: skip
    if backend == "triton":
        stats["kernel"] = kernel
    return out, stats
