"""backend="flex": the same plan executed by PyTorch FlexAttention (which also has a backward).

FlexAttention takes one key sequence, but PBS reads permuted keys for earlier segments and
original keys for the own segment. We therefore give it KV = [permuted (padded to whole
blocks) ; original], of length n_kb*block + N: earlier-segment blocks index the first half,
own-segment blocks the second, and only the diagonal block carries a (causal) mask_mod.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .config import PBSConfig
from .plan import Plan, Timer, make_plan

_compiled = None


def compiled_flex_attention():
    """flex_attention, compiled on the GPU (the eager version materialises all scores)."""
    global _compiled
    if _compiled is None:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def block_mask_from_plan(plan: Plan, n: int, n_q_heads: int, eager: bool = False) -> BlockMask:
    """BlockMask over KV = [permuted padded to n_kb*block ; original] from the plan's lists.

    Compiled FlexAttention skips mask_mod on full blocks, so the mask_mod only needs to be
    right on the diagonal. Eager FlexAttention (CPU) applies mask_mod everywhere and ignores
    the block structure: with ``eager`` the mask_mod also encodes the kept blocks.
    """
    B = plan.counts.shape[0]
    bs, bps = plan.block_size, plan.segment_size // plan.block_size
    n_qb, n_kb = plan.indices.shape[-2:]
    dev = plan.counts.device
    offset = n_kb * bs  # first token of the original half
    qb = torch.arange(n_qb, device=dev, dtype=torch.int32)
    seg_first = (qb // bps) * bps
    # Partial blocks: only the diagonal one, in the original half.
    diag_num = torch.ones(B, n_q_heads, n_qb, device=dev, dtype=torch.int32)
    # FlexAttention wants index rows as wide as the number of KV blocks (2 * n_kb).
    diag_idx = torch.zeros(B, n_q_heads, n_qb, 2 * n_kb, device=dev, dtype=torch.int32)
    diag_idx[..., 0] = n_kb + qb
    # Full blocks: the kept earlier blocks, then own-segment blocks before the diagonal.
    full_idx = torch.zeros(B, n_q_heads, n_qb, 2 * n_kb, device=dev, dtype=torch.int32)
    full_idx[..., :n_kb] = plan.indices
    j = torch.arange(bps, device=dev, dtype=torch.int32)
    own = (n_kb + seg_first[:, None] + j).clamp(max=2 * n_kb - 1)  # (n_qb, bps)
    # Slots past the valid count are ignored; clamp keeps the scatter inside the row.
    where = (plan.counts[..., None].long() + j.long()).clamp(max=2 * n_kb - 1)
    full_idx.scatter_(-1, where, own.expand(B, n_q_heads, n_qb, bps))
    full_num = plan.counts + (qb - seg_first)

    def causal_on_original(b, h, q_idx, kv_idx):
        return (kv_idx < offset) | (kv_idx - offset <= q_idx)

    mask_mod = causal_on_original
    if eager:
        table = torch.zeros(B, n_q_heads, n_qb, 2 * n_kb + 1, device=dev, dtype=torch.bool)
        slot = torch.arange(2 * n_kb, device=dev)
        valid = slot < full_num[..., None]
        table.scatter_(-1, torch.where(valid, full_idx.long(), 2 * n_kb), True)
        table[..., : 2 * n_kb].scatter_(-1, diag_idx[..., :1].long(), True)

        def kept_and_causal(b, h, q_idx, kv_idx):
            in_block = table[b, h, q_idx // bs, kv_idx // bs]
            return in_block & causal_on_original(b, h, q_idx, kv_idx)

        mask_mod = kept_and_causal

    return BlockMask.from_kv_blocks(
        diag_num, diag_idx, full_num.contiguous(), full_idx, BLOCK_SIZE=bs,
        mask_mod=mask_mod, seq_lengths=(n, offset + n),
    )  # fmt: skip


def pbs_flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: PBSConfig, timer: Timer
) -> tuple[torch.Tensor, Plan]:
    """Plan with the shared code, then run FlexAttention on the concatenated KV.

    q: (B, HQ, N, D); k, v: (B, HKV, N, D). Returns ((B, HQ, N, D), plan).
    """
    B, HKV, N, D = k.shape
    bs = config.block_size
    padded = -(-N // bs) * bs
    kcat = torch.empty(B, HKV, padded + N, D, device=k.device, dtype=k.dtype)
    vcat = torch.empty_like(kcat)
    kcat[:, :, padded:] = k
    vcat[:, :, padded:] = v
    if padded > N:  # never attended (last segment), but keep it finite
        kcat[:, :, N:padded] = 0
        vcat[:, :, N:padded] = 0
    plan = make_plan(q, k, v, config, kv_out=(kcat, vcat), timer=timer)
    mask = block_mask_from_plan(plan, N, q.shape[1], eager=not q.is_cuda)
    timer.mark("select")  # building the BlockMask is part of selection
    if q.is_cuda:
        # Flex's default tiles are 128 wide; our blocks must be a multiple of its tiles.
        opts = {"BLOCK_M": bs, "BLOCK_N": bs} if bs < 128 else None
        out = compiled_flex_attention()(
            q, kcat, vcat, block_mask=mask, scale=plan.scale, enable_gqa=True, kernel_options=opts
        )
    else:
        out = flex_attention(q, kcat, vcat, block_mask=mask, scale=plan.scale, enable_gqa=True)
    timer.mark("attention")
    return out, plan
