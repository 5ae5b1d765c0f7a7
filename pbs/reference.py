"""Plain PyTorch reference: the same plan (permutation + selection), dense masked softmax.

The mask is built in the original key order: a key of an earlier segment is visible when its
permuted position falls in a kept block; a key of the own segment when it is causal. Since
attention does not depend on the order of keys, this equals the permuted computation.
O(N^2) memory: for tests and small inputs.
"""

from __future__ import annotations

import torch

from .config import PBSConfig
from .plan import Plan, check_inputs, dense_attention, make_plan, resolve_scale


def visible_mask(plan: Plan, n_q_heads: int) -> torch.Tensor:
    """(B, HQ, N, N) bool: query i may attend key j (original positions)."""
    B, HKV, N = plan.perm.shape
    G = n_q_heads // HKV
    bs, seg = plan.block_size, plan.segment_size
    n_qb, n_kb = plan.indices.shape[-2:]
    dev = plan.perm.device
    slot = torch.arange(n_kb, device=dev)
    kept = torch.zeros(B, n_q_heads, n_qb, n_kb + 1, dtype=torch.bool, device=dev)
    valid = slot < plan.counts[..., None]
    kept.scatter_(-1, torch.where(valid, plan.indices.long(), n_kb), True)
    kept = kept[..., :n_kb]
    # position of each original key inside the permuted order
    pos = torch.empty_like(plan.perm, dtype=torch.long)
    pos.scatter_(-1, plan.perm.long(), torch.arange(N, device=dev).expand(B, HKV, N))
    key_block = (pos // bs).repeat_interleave(G, dim=1)  # (B, HQ, N)
    i = torch.arange(N, device=dev)
    q_block = i // bs
    rows = kept[:, :, q_block]  # (B, HQ, N, n_kb)
    earlier_kept = rows.gather(-1, key_block[:, :, None, :].expand(B, n_q_heads, N, N))
    earlier = (i[None, :] // seg) < (i[:, None] // seg)
    own = ((i[None, :] // seg) == (i[:, None] // seg)) & (i[None, :] <= i[:, None])
    return (earlier_kept & earlier) | own


def attend_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Dense masked softmax in fp32 (fp64 for fp64 inputs) over the keys the plan keeps. Returns q's dtype."""
    G = q.shape[1] // k.shape[1]
    dt = torch.promote_types(q.dtype, torch.float32)
    kf = k.to(dt).repeat_interleave(G, dim=1)
    vf = v.to(dt).repeat_interleave(G, dim=1)
    s = (q.to(dt) @ kf.transpose(-1, -2)) * plan.scale
    s = s.masked_fill(~visible_mask(plan, q.shape[1]), float("-inf"))
    return (s.softmax(-1) @ vf).to(q.dtype)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: PBSConfig | None = None
) -> torch.Tensor:
    """Same selection as :func:`pbs.pbs_attention`, computed with a dense masked softmax.

    q: (B, HQ, N, D); k, v: (B, HKV, N, D). Returns (B, HQ, N, D) in q's dtype.
    """
    config = config or PBSConfig()
    check_inputs(q, k, v)
    if q.shape[2] < config.min_seq_len:
        return dense_attention(
            q.float(), k.float(), v.float(), resolve_scale(config, q.shape[-1])
        ).to(q.dtype)
    return attend_plan(q, k, v, make_plan(q, k, v, config))
