"""Arrival counters: how a kernel's last program finds out that it is last.

Kernels that split one result over several programs (the split-KV decode attention, the
sampler's vocabulary chunks) write per-program partials and then count themselves in an int32
counter per result (``tl.atomic_add``, acq_rel at GPU scope, after a barrier); the program that
arrives last merges the partials and sets the counter back to zero. That saves the separate
merge kernel and its launch, which at decode sizes costs more than the merge itself.

The counters are one int32 buffer per device, zero between launches, so a captured CUDA graph
needs no memset before each replay. Launches that use them run one after another on one stream
(as a decode step's kernels do); two in flight at once on different streams would share
counters.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_COUNTERS: dict[torch.device, torch.Tensor] = {}


def arrival_counters(device: torch.device, n: int, user: str) -> torch.Tensor:
    """The device's int32 arrival counters, at least ``n`` of them, all zero.

    Grown only outside graph capture: a buffer made inside one would be zeroed only when the
    graph replays. ``user`` names the caller in that error.
    """
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"{user}: the first call needing {n} arrival counters on {device} is inside "
                "CUDA graph capture; make one call of this size before capturing (it allocates "
                "the counters)"
            )
        counters = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _COUNTERS[device] = counters
    return counters


@triton.jit
def last_to_arrive(counter, arrivals):
    """Count this program in at ``counter``; True in the last of ``arrivals`` programs, which
    also sets the count back to zero. Every thread's stores before the call happen before the
    count (the barrier), and the count releases them to the last program (acq_rel at GPU
    scope); that one should read them through L2 (``cache_modifier=".cg"``), not its L1."""
    tl.debug_barrier()
    last = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == arrivals - 1
    if last:
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # for the next launch
    return last
