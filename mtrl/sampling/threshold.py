"""Entropy thresholds kept on the device: quantiles without host synchronisation.

The (1-p) quantile uses numpy's default ``method="linear"``: for n values sorted
ascending, position ``q * (n - 1)`` interpolated between its two neighbours. The number
of valid values ``n`` is a device tensor; invalid slots hold ``+inf`` and sort last, so the
quantile is read with ``gather`` at device-computed indices and never needs ``.item()``.
"""

from __future__ import annotations

import torch


def sorted_prefix_quantile(
    sorted_values: torch.Tensor, count: torch.Tensor, q: torch.Tensor, fallback: torch.Tensor
) -> torch.Tensor:
    """Linear-interpolated ``q`` quantile of ``sorted_values[:count]`` (ascending), on device.

    ``count`` and ``q`` are 0-dim tensors; returns ``fallback`` when ``count == 0``.
    """
    n = count.to(torch.float64)
    last = (n - 1).clamp(min=0)
    pos = q.to(torch.float64) * last
    lo = pos.floor()
    hi = torch.minimum(lo + 1, last)
    frac = (pos - lo).to(sorted_values.dtype)
    v_lo = sorted_values.gather(0, lo.long().reshape(1)).squeeze(0)
    v_hi = sorted_values.gather(0, hi.long().reshape(1)).squeeze(0)
    # v_hi == v_lo when hi == lo, so frac * (v_hi - v_lo) is 0 there (never inf - inf).
    value = torch.where(hi > lo, v_lo + frac * (v_hi - v_lo), v_lo)
    return torch.where(count > 0, value, fallback)


def masked_quantile(
    values: torch.Tensor, q: torch.Tensor, active: torch.Tensor | None, fallback: torch.Tensor
) -> torch.Tensor:
    """``q`` quantile of the active entries of a 1-D tensor (all when ``active`` is None)."""
    if active is None:
        count = torch.full((), values.shape[0], dtype=torch.long, device=values.device)
        padded = values
    else:
        count = active.sum()
        padded = torch.where(active, values, torch.full_like(values, float("inf")))
    return sorted_prefix_quantile(torch.sort(padded).values, count, q, fallback)


class EntropyWindow:
    """Ring buffer of the last ``size`` generated-token entropies, on the device.

    ``add`` appends the active rows of one decoding step in row order; when more than
    ``size`` rows come at once only the last ``size`` are kept. The write pointer and the
    count are device tensors updated in place, so ``add`` and ``quantile`` never sync and
    can be captured in a CUDA graph.
    """

    def __init__(self, size: int, device: torch.device | str = "cpu"):
        if size < 1:
            raise ValueError(f"window_size: must be >= 1, got {size}")
        self.size = int(size)
        # One extra slot at the end takes the writes of inactive rows (a scatter sink).
        self.buffer = torch.full((self.size + 1,), float("inf"), device=device)
        self.ptr = torch.zeros((), dtype=torch.long, device=device)
        self.count = torch.zeros((), dtype=torch.long, device=device)

    def reset(self) -> None:
        self.buffer.fill_(float("inf"))
        self.ptr.zero_()
        self.count.zero_()

    def add(self, values: torch.Tensor, active: torch.Tensor | None = None) -> None:
        values = values.to(self.buffer.dtype)
        if active is None:
            active = torch.ones(values.shape[0], dtype=torch.bool, device=values.device)
        a = active.long()
        rank = torch.cumsum(a, 0) - 1
        n_new = a.sum()
        keep = active & (rank >= n_new - self.size)
        index = torch.where(keep, (self.ptr + rank) % self.size, self.size)
        self.buffer.scatter_(0, index, values)
        self.ptr.copy_((self.ptr + n_new) % self.size)
        self.count.copy_(torch.clamp(self.count + n_new, max=self.size))

    def quantile(self, q: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        """Linear-interpolated ``q`` quantile of the values in the window (``fallback`` if empty)."""
        sorted_values = torch.sort(self.buffer[: self.size]).values
        return sorted_prefix_quantile(sorted_values, self.count, q, fallback)

    def values(self) -> torch.Tensor:
        """The entropies now in the window, oldest first (syncs: for metrics, not the hot path)."""
        n = int(self.count)
        if n < self.size:
            return self.buffer[:n].clone()
        p = int(self.ptr)
        return torch.cat([self.buffer[p : self.size], self.buffer[:p]])
