"""Entropy thresholds kept on the device: quantiles without host synchronisation.

The (1-p) quantile uses numpy's default ``method="linear"``: for n values sorted
ascending, position ``q * (n - 1)`` interpolated between its two neighbours. The number
of valid values ``n`` is a device tensor; invalid slots hold ``+inf`` and sort last, so the
quantile is read with ``gather`` at device-computed indices and never needs ``.item()``.

``EntropyWindow`` keeps a sorted mirror of its ring buffer next to it instead of sorting the
buffer for every quantile: a full sort of the default 100,000 values took about 41 us of a
2.6 ms decode step on an H100 (1.6%), every step, although a step changes at most B values.
``add`` merges the step's kept values in and the values they overwrite out
(``mtrl.sampling.window_merge``: on CUDA two Triton launches, the ring write and the merge,
and a copy; torch ops elsewhere; O(size) work plus binary searches in the B changed values),
so ``quantile`` reads two elements of the mirror and sorts nothing: 40 us (1.8%) less a step
at batch 64 on an H200 (bench/results/rollout.md).
"""

from __future__ import annotations

import torch

from mtrl.sampling import window_merge as wm
from mtrl.triton_device import triton_runs_on


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

    ``sorted``: the buffer's ``size`` slots in ascending order, ``+inf`` for those not filled
    yet; after every ``add``, ``sorted == torch.sort(buffer[:size]).values`` bit for bit.
    ``add`` keeps it so by a merge (``mtrl.sampling.window_merge``), ``quantile`` reads it.
    NaN entropies (invalid logits, which the sampler's own check reports) are stored as
    ``+inf`` and ``-0.0`` as ``+0.0``, in the buffer and the mirror alike: the merge needs
    comparisons to be a total order, so a NaN counts as the largest value, where a sort also
    put it.

    ``fused``: the Triton kernels of ``mtrl.sampling.window_merge`` (the ring step and the
    merge, one launch each). None (default): on CUDA devices; True: also on the CPU when
    Triton interprets kernels (``TRITON_INTERPRET=1``, the tests); False: torch ops, with the
    same results.
    """

    def __init__(self, size: int, device: torch.device | str = "cpu", fused: bool | None = None):
        if size < 1:
            raise ValueError(f"window_size: must be >= 1, got {size}")
        device = torch.device(device)
        if fused and not triton_runs_on(device):
            raise ValueError(
                f"EntropyWindow: fused=True needs CUDA or TRITON_INTERPRET=1, got {device}"
            )
        self.fused = device.type == "cuda" if fused is None else bool(fused)
        self.size = int(size)
        # One extra slot at the end takes the writes of inactive rows (a scatter sink).
        self.buffer = torch.full((self.size + 1,), float("inf"), device=device)
        self.ptr = torch.zeros((), dtype=torch.long, device=device)
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self.sorted = torch.full((self.size,), float("inf"), device=device)
        # The merge's output; copied back so that `sorted` keeps its address (CUDA graphs).
        self._merged = torch.empty_like(self.sorted)

    def reset(self) -> None:
        self.buffer.fill_(float("inf"))
        self.sorted.fill_(float("inf"))
        self.ptr.zero_()
        self.count.zero_()

    def add(self, values: torch.Tensor, active: torch.Tensor | None = None) -> None:
        if values.shape[0] == 0:
            return
        if self.fused and values.shape[0] <= wm.MAX_RING_ROWS:
            added, removed, n_kept = wm.ring_add(values, active, self.buffer, self.ptr, self.count)
        else:
            added, removed, n_kept = self._ring_add_torch(values, active)
        merge = wm.merge_window if self.fused else wm.merge_window_reference
        merge(self.sorted, added, removed, n_kept, self._merged)
        self.sorted.copy_(self._merged)

    def _ring_add_torch(
        self, values: torch.Tensor, active: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ring step in torch ops (``window_merge.ring_add`` is the same in one launch):
        writes the kept values into the buffer, moves ``ptr`` and ``count``, and returns the
        merge's inputs: (added, removed) sorted, +inf after the first ``n_kept``."""
        inf = float("inf")
        # NaN -> +inf and -0.0 -> +0.0 (x + 0.0), see the class doc
        values = values.to(self.buffer.dtype) + 0.0
        values = torch.nan_to_num(values, nan=inf, posinf=inf, neginf=-inf)
        if active is None:
            active = torch.ones(values.shape[0], dtype=torch.bool, device=values.device)
        a = active.long()
        rank = torch.cumsum(a, 0) - 1
        n_new = a.sum()
        keep = active & (rank >= n_new - self.size)
        index = torch.where(keep, (self.ptr + rank) % self.size, self.size)
        # The kept rows' values come in, the values of the slots they overwrite (+inf while
        # the window fills) go out; the other rows sort last as +inf and the merge reads only
        # the first n_kept of each.
        old = self.buffer.gather(0, index)
        added, removed = torch.where(keep, torch.stack([values, old]), inf).sort(dim=1).values
        self.buffer.scatter_(0, index, values)
        self.ptr.copy_((self.ptr + n_new) % self.size)
        self.count.copy_(torch.clamp(self.count + n_new, max=self.size))
        return added, removed, torch.clamp(n_new, max=self.size)

    def quantile(self, q: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        """Linear-interpolated ``q`` quantile of the values in the window (``fallback`` if empty).

        Read from the sorted mirror: unfilled slots are ``+inf`` and come after the ``count``
        values, so the window's values are ``sorted[:count]``."""
        return sorted_prefix_quantile(self.sorted, self.count, q, fallback)

    def values(self) -> torch.Tensor:
        """The entropies now in the window, oldest first (syncs: for metrics, not the hot path)."""
        n = int(self.count)
        if n < self.size:
            return self.buffer[:n].clone()
        p = int(self.ptr)
        return torch.cat([self.buffer[p : self.size], self.buffer[:p]])
