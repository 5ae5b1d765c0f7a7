"""transformers integration: ``pbs.hf.register()`` makes ``attn_implementation="pbs"`` work.

Prefill of a causal layer (query length == key length, no cached prefix) with at least
``min_seq_len`` tokens runs PBS-Attn; everything else is handed to transformers' own SDPA
path unchanged: decoding steps, prompts with a cached prefix, short prompts, sliding-window
or soft-capped layers, and dropout in training. Forwards with gradients take the sparse path
too (both backends have a backward), so rollout prefill, old-policy and training log-probs
all use the same attention.

Padding: for plain causal prefill our mask function returns the 2D padding mask instead of a
(B, 1, N, N) tensor. Each row whose valid tokens are contiguous (left or right padding) is then
attended on its own unpadded slice, so segments start at its first real token and pad keys are
never seen; pad query rows get zeros. Any other pattern falls back to dense SDPA with the
exact mask transformers would have built.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from .api import pbs_attention
from .config import PBSConfig

logger = logging.getLogger(__name__)

NAME = "pbs"
_config = PBSConfig()
# How many attention calls took each path since import (tests and logs read it); "pbs_grad"
# counts the sparse calls that recorded gradients.
calls = {"pbs": 0, "dense": 0, "pbs_grad": 0}


def register(config: PBSConfig | None = None, name: str = NAME, **fields) -> PBSConfig:
    """Register PBS-Attn under ``name`` for every transformers model; returns the config.

    ``fields`` override PBSConfig fields (block_size, segment_size, threshold, min_seq_len,
    force_sink, permute, backend, scale). Calling again replaces the config.
    """
    global _config
    cfg = config or PBSConfig()
    if fields:
        cfg = dataclasses.replace(cfg, **fields)
    _config = cfg
    AttentionInterface.register(name, pbs_attention_forward)
    AttentionMaskInterface.register(name, pbs_mask)
    return cfg


def get_config() -> PBSConfig:
    """The config the registered attention uses."""
    return _config


# Out of torch.compile: whether a mask is needed at all is read from the mask's values.
@torch.compiler.disable
def pbs_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """Mask function for ``pbs``: None or the 2D (B, N) padding mask for plain causal prefill,
    otherwise exactly what ``sdpa`` would get."""
    plain_prefill = (
        mask_function is causal_mask_function
        and isinstance(q_offset, int)
        and isinstance(kv_offset, int)
        and q_offset == 0
        and kv_offset == 0
        and q_length == kv_length
    )
    if plain_prefill:
        if attention_mask is None:
            return None
        if attention_mask.dim() == 2 and attention_mask.shape[-1] >= kv_length:
            am = attention_mask[:, -kv_length:].bool()
            return None if bool(am.all()) else am
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        **kwargs,
    )


def _dense(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs):
    if attention_mask is not None and attention_mask.dim() == 2:  # our padded-prefill mask
        B, _, L, _ = query.shape
        attention_mask = sdpa_mask(
            batch_size=B, q_length=L, kv_length=key.shape[2], attention_mask=attention_mask,
            allow_is_causal_skip=False, device=query.device,
        )  # fmt: skip
    return sdpa_attention_forward(
        module, query, key, value, attention_mask,
        dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs,
    )  # fmt: skip


def _contiguous_spans(mask2d: torch.Tensor) -> list[tuple[int, int]] | None:
    """[start, end) of the valid tokens per row, or None if some row has holes."""
    valid = mask2d.bool()
    n = valid.shape[1]
    count = valid.sum(1)
    start = valid.int().argmax(1)
    spans = list(zip(start.tolist(), (start + count).tolist(), strict=True))
    pos = torch.arange(n, device=valid.device)
    inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < (start + count)[:, None])
    return spans if bool((inside == valid).all()) else None


# Kept out of torch.compile, like pbs_mask (a compiled prefill runs them between its graphs):
# the path taken depends on the mask's contents, and the call counters are Python state that a
# traced call would turn into guards, recompiling on every forward.
@torch.compiler.disable
def pbs_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function. query: (B, HQ, L, D); key, value: (B, HKV, S, D).

    Returns ((B, L, HQ, D), None) like transformers' SDPA integration.
    """
    cfg = _config
    L, S = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    dense = (
        not causal
        or L != S
        or L < cfg.min_seq_len
        or (dropout > 0.0 and module.training)
        or kwargs.get("sliding_window") is not None
        or kwargs.get("softcap") is not None
        or (attention_mask is not None and attention_mask.dim() != 2)
    )
    spans = None
    if not dense and attention_mask is not None:
        spans = _contiguous_spans(attention_mask)
        dense = spans is None
    calls["dense" if dense else "pbs"] += 1
    if dense:
        return _dense(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        if not calls["pbs_grad"]:
            logger.info("PBS-Attn: training forwards use the sparse path")
        calls["pbs_grad"] += 1
    cfg = dataclasses.replace(cfg, scale=scaling) if scaling is not None else cfg
    if spans is None:
        out = pbs_attention(query, key, value, config=cfg)
    else:
        out = torch.zeros_like(query)
        for b, (s, e) in enumerate(spans):
            if e > s:
                out[b : b + 1, :, s:e] = pbs_attention(
                    query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e],
                    config=cfg,
                )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None
