"""What every backend shares: input checks, the plan (score, permute, select) and a phase timer.

The triton backend (:mod:`pbs.api`), the flex backend (:mod:`pbs.flex`) and the reference
(:mod:`pbs.reference`) all build the same :class:`Plan` here and differ only in how they attend
over it, so they depend on this module and never on each other.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

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


class Timer:
    """Phase timer: CUDA events on the GPU (one sync at the end), wall clock on the CPU.

    ``mark(name)`` closes the phase ``name`` that began at the previous mark; ``result()`` gives
    ``{name_ms: milliseconds}`` summed per name, or {} when not ``enabled``.
    """

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
    """The softmax scale: ``config.scale``, or 1/sqrt(head_dim) as in SDPA."""
    return config.scale if config.scale is not None else 1.0 / math.sqrt(head_dim)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """One-line ValueError unless q is (B, HQ, N, D) and k, v are (B, HKV, N, D), HKV | HQ."""
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
    timer: Timer | None = None,
) -> Plan:
    """Score + permute keys, then select kept blocks. Same code for every backend.

    kv_out: optional (B, HKV, >=N, D) buffers for the permuted K/V (the flex backend's layout).
    With gradients enabled the permuted K/V are differentiable gathers of k and v.
    """
    check_inputs(q, k, v)
    timer = timer or Timer(q.device, False)
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


def density(plan: Plan) -> tuple[float, int, int]:
    """(kept / causal blocks, kept, causal) counting the exactly computed own segment."""
    bps = plan.segment_size // plan.block_size
    n_qb = plan.counts.shape[-1]
    qb = torch.arange(n_qb, device=plan.counts.device)
    own = qb - (qb // bps) * bps + 1  # own-segment blocks up to and including the diagonal
    heads = plan.counts.shape[0] * plan.counts.shape[1]
    kept = int(plan.counts.sum().item()) + heads * int(own.sum().item())
    causal = heads * int((qb + 1).sum().item())
    return kept / causal, kept, causal


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Dense causal SDPA with GQA: the fallback for short sequences. Shapes as in make_plan."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
