"""Entropy of the untempered next-token distribution (T = 1), in nats, computed in fp32."""

from __future__ import annotations

import torch


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) along the last dim, in fp32.

    ``-inf`` logits (masked tokens) contribute 0. Shape (..., vocab) -> (...).
    """
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.special.entr(probs).sum(dim=-1)
