"""The public entry point: plan (score, permute, select) then attend with a backend."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import kernels
from .config import PBSConfig
from .permute import identity_permutation, key_importance, permute_kv, segment_permutation
from .select import block_logits, select_blocks, sink_block


@dataclass
class Plan:
    """What the attention step needs, shared by every backend and the reference.

    perm: (B, HKV, N) int32 source position of each permuted key.
    kp, vp: (B, HKV, N, D) permuted keys and values (views; may live in a larger buffer).
    counts: (B, HQ, n_qb) int32 kept earlier-segment key blocks per query block.
    indices: (B, HQ, n_qb, n_kb) int32 their block indices into kp/vp, ascending.
    """

    perm: torch.Tensor
    kp: torch.Tensor
    vp: torch.Tensor
    counts: torch.Tensor
    indices: torch.Tensor
    block_size: int
    segment_size: int
    scale: float
    times: dict = field(default_factory=dict)


class _Timer:
    """Phase timer: CUDA events on the GPU (one sync at the end), wall clock on the CPU."""

    def __init__(self, device: torch.device, enabled: bool):
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []
        self.mark("start")

    def mark(self, name: str) -> None:
        if not self.enabled:
            return
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((name, ev))
        else:
            self.marks.append((name, time.perf_counter()))

    def result(self) -> dict:
        if not self.enabled:
            return {}
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:], strict=False):
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
            out[f"{name}_ms"] = out.get(f"{name}_ms", 0.0) + ms
        return out


def resolve_scale(config: PBSConfig, head_dim: int) -> float:
    return config.scale if config.scale is not None else 1.0 / math.sqrt(head_dim)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError("pbs: expected q (B, HQ, N, D) and k, v (B, HKV, N, D)")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"pbs: causal prefill needs matching q/k shapes, got {q.shape} {k.shape}")
    if q.shape[1] % k.shape[1]:
        raise ValueError("pbs: query heads must be a multiple of key/value heads")


def make_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: PBSConfig,
    kv_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    timer: _Timer | None = None,
) -> Plan:
    """Score + permute keys, then select kept blocks. Same code for every backend."""
    _check(q, k, v)
    timer = timer or _Timer(q.device, False)
    bs, seg = config.block_size, config.segment_size
    scale = resolve_scale(config, q.shape[-1])
    if config.permute:
        perm = segment_permutation(key_importance(q, k, bs, scale), seg)
    else:
        perm = identity_permutation(k).contiguous()
    kp, vp = permute_kv(k, v, perm, *(kv_out or (None, None)))
    kp, vp = kp[:, :, : k.shape[2]], vp[:, :, : k.shape[2]]
    timer.mark("score_permute")
    logits = block_logits(q, kp, bs, scale)
    if config.force_sink:
        sink = sink_block(perm, bs, seg)
    else:
        sink = torch.full(perm.shape[:2], -1, device=q.device, dtype=torch.int32)
    counts, indices = select_blocks(
        logits, sink, config.threshold, seg // bs, q.shape[1] // k.shape[1]
    )
    timer.mark("select")
    return Plan(perm, kp, vp, counts, indices, bs, seg, scale)


def density(plan: Plan, n: int) -> tuple[float, int, int]:
    """(kept / causal blocks, kept, causal) counting the exactly computed own segment."""
    bs, bps = plan.block_size, plan.segment_size // plan.block_size
    n_qb = plan.counts.shape[-1]
    qb = torch.arange(n_qb, device=plan.counts.device)
    own = qb - (qb // bps) * bps + 1  # own-segment blocks up to and including the diagonal
    heads = plan.counts.shape[0] * plan.counts.shape[1]
    kept = int(plan.counts.sum().item()) + heads * int(own.sum().item())
    causal = heads * int((qb + 1).sum().item())
    del bs, n
    return kept / causal, kept, causal


def dense_attention(q, k, v, scale: float) -> torch.Tensor:
    """Dense causal SDPA with GQA: the fallback for short sequences."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


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
    """
    config = config or PBSConfig()
    _check(q, k, v)
    N = q.shape[2]
    scale = resolve_scale(config, q.shape[-1])
    timer = _Timer(q.device, timing)
    if N < config.min_seq_len:
        out = dense_attention(q, k, v, scale)
        timer.mark("attention")
        stats = {"path": "dense", "backend": "sdpa", "density": 1.0, **timer.result()}
        return (out, stats) if return_stats else out
    backend = config.backend
    if backend == "flex":
        from . import flex

        out, plan = flex.pbs_flex_attention(q, k, v, config, timer)
    else:
        plan = make_plan(q, k, v, config, timer=timer)
        if kernels.available(q):
            kernel = kernels.attention_kernel(q, config.block_size)
            out = kernels.block_sparse_attention(
                q, k, v, plan.kp, plan.vp, plan.counts, plan.indices,
                config.block_size, config.segment_size, scale, kernel=kernel,
            )  # fmt: skip
        else:  # no Triton here (CPU without the interpreter): same result, dense masked
            from .reference import attend_plan

            out, backend = attend_plan(q, k, v, plan), "torch"
        timer.mark("attention")
    if not return_stats:
        return out
    d, kept, causal = density(plan, N)
    stats = {"path": "sparse", "backend": backend, "density": d, "kept_blocks": kept,
             "causal_blocks": causal, **timer.result()}  # fmt: skip
    if backend == "triton":
        stats["kernel"] = kernel
    return out, stats
