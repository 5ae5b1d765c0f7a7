"""The entropy window's step on the device: the ring write, then a merge into its sorted mirror.

    added, removed, n_kept = ring_add(values, active, buffer, ptr, count)   # Triton, 1 launch
    merge_window(sorted_values, added, removed, n_kept, out)               # Triton, 1 launch
    merge_window_reference(sorted_values, added, removed, n_kept, out)     # torch ops

Why: sorting the window costs a full radix sort every decode step (100,000 values: about 41 us
on an H100), while one step changes at most B (64..256) of them. The merge reads and writes
each value once and finds its new position with binary searches in the B changed values.

``ring_add`` is ``EntropyWindow``'s ring step (its torch version: ``_ring_add_torch``) in one
program: the active rows' ranks (a cumsum), the kept rows (the last ``size`` when more come),
the old values of the slots they overwrite, both sorted (``tl.sort``, B <= MAX_RING_ROWS), then
the writes into the buffer and the new pointer and count. One launch instead of some twenty
small torch ops, which inside a CUDA graph cost 2-3 us each.

``merge_window`` writes ``out = sort(sorted_values - removed[:n_kept] + added[:n_kept])``
(multisets):

- ``sorted_values``: (N,) fp32 ascending, the window's values before this step; ``+inf`` for
  the slots not filled yet (they are values like any other here);
- ``removed``: (B,) fp32 ascending, its first ``n_kept`` entries the old values that this step
  overwrites (a sub-multiset of ``sorted_values``), the rest ``+inf``;
- ``added``: (B,) fp32 ascending, its first ``n_kept`` entries the new values, the rest ``+inf``;
- ``n_kept``: 0-dim integer tensor on the device, ``<= min(B, N)``; read on the device, so the
  call has no host sync and a CUDA graph captures it once for every count;
- ``out``: (N,) fp32, not ``sorted_values`` (every position of it is written).
No NaN anywhere: comparisons must be a total order (``EntropyWindow.add`` stores NaN as ``+inf``).

Positions (a bijection onto [0, N); new values go before old values equal to them):

- old value v at index j: ``le_r``, ``lt_r``, ``le_a`` = #removed <= v, #removed < v,
  #added <= v (all over the first n_kept). The removed copies of v are the first
  ``eq_r = le_r - lt_r`` of its run of equal values, so v at j is removed iff
  ``j < eq_r or sorted_values[j - eq_r] < v``; a kept one moves to ``j - le_r + le_a``.
- new value w = added[i]: ``#old < w - #removed < w + i`` (ties among new values by index).

Every count is a binary search (log B steps) in ``added`` or ``removed``, never a B-wide
comparison, so a window of 1e8 costs O(N log B). ``#old < w`` is a search in the old sorted
array: the kernel hands each new value to the program whose tile of old values it falls in
(``sorted_values[t0 - 1] < w <= sorted_values[t1 - 1]``), which searches only that tile (log
BLOCK steps in lines it has just read) instead of the whole array (log N dependent steps).

Triton runs the kernels on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (the tests). The
launches are the custom operators ``torch.ops.mtrl.ring_add`` and ``torch.ops.mtrl.merge_window``
(declared with what they mutate), so the sampler's ``torch.compile``-d threshold step traces two
opaque ops, not the launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # old values per program: 98 programs at the default window of 100,000
NUM_WARPS = 4
MAX_RING_ROWS = 4096  # rows of one step sorted in one program (``ring_add``); more: torch ops


# ----------------------------------------------------------------------------- ring add
@triton.jit
def _ring_add_kernel(
    VALUES, ACTIVE, BUFFER, PTR, COUNT, ADDED, REMOVED, N_KEPT, B, SIZE,
    HAS_ACTIVE: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """One program: a decode step's values into the ring buffer, and the merge's inputs.

    VALUES (B,) float, ACTIVE (B,) bool (HAS_ACTIVE), BUFFER (SIZE + 1,) fp32, PTR and COUNT
    0-dim int64, updated in place. Writes ADDED and REMOVED (BLOCK_B,) fp32: the kept values
    and the values of the slots they overwrite, each sorted, +inf after the first N_KEPT
    (0-dim int64). NaN is stored as +inf and -0.0 as +0.0 (``EntropyWindow``'s doc).
    """
    r = tl.arange(0, BLOCK_B)
    row = r < B
    x = tl.load(VALUES + r, mask=row, other=0.0).to(tl.float32)
    x = tl.where(x != x, float("inf"), x + 0.0)
    act = row
    if HAS_ACTIVE:
        act = row & (tl.load(ACTIVE + r, mask=row, other=0) != 0)
    a = act.to(tl.int32)
    rank = tl.cumsum(a, 0) - 1
    n_new = tl.sum(a, 0)
    keep = act & (rank >= n_new - SIZE)  # more than SIZE: only the last SIZE stay
    ptr = tl.load(PTR)
    slot = (ptr + rank) % SIZE
    old = tl.load(BUFFER + slot, mask=keep, other=float("inf"))
    tl.store(ADDED + r, tl.sort(tl.where(keep, x, float("inf"))))
    tl.store(REMOVED + r, tl.sort(old))
    tl.debug_barrier()  # every old value is read before a slot is overwritten
    tl.store(BUFFER + slot, x, mask=keep)
    tl.store(PTR, (ptr + n_new) % SIZE)
    tl.store(COUNT, tl.minimum(tl.load(COUNT) + n_new, SIZE))
    tl.store(N_KEPT, tl.minimum(n_new, SIZE).to(tl.int64))


@torch.library.custom_op(
    "mtrl::ring_add", mutates_args=("buffer", "ptr", "count", "added", "removed", "n_kept")
)
def _ring_add_op(
    values: torch.Tensor,
    active: torch.Tensor | None,
    buffer: torch.Tensor,
    ptr: torch.Tensor,
    count: torch.Tensor,
    added: torch.Tensor,
    removed: torch.Tensor,
    n_kept: torch.Tensor,
) -> None:
    _ring_add_kernel[(1,)](
        values, values if active is None else active, buffer, ptr, count, added, removed,
        n_kept, values.shape[0], buffer.shape[0] - 1,
        HAS_ACTIVE=active is not None, BLOCK_B=added.shape[0], num_warps=NUM_WARPS,
    )  # fmt: skip


@_ring_add_op.register_fake
def _(values, active, buffer, ptr, count, added, removed, n_kept):
    return None


def ring_add(
    values: torch.Tensor,
    active: torch.Tensor | None,
    buffer: torch.Tensor,
    ptr: torch.Tensor,
    count: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``EntropyWindow.add``'s ring step in one launch: returns (added, removed, n_kept) for
    ``merge_window`` (``added``/``removed`` padded to a power of two with +inf).

    ``values`` (B,) float, B <= ``MAX_RING_ROWS``; ``active`` (B,) bool or None (all);
    ``buffer`` (size + 1,) fp32, ``ptr``, ``count`` 0-dim int64, updated in place (inactive
    rows write nothing; the last slot, the torch path's scatter sink, is not touched).
    ``EntropyWindow._ring_add_torch`` is the same step in torch ops.
    """
    b = values.shape[0]
    if not 0 < b <= MAX_RING_ROWS:
        raise ValueError(f"ring_add: 1 to {MAX_RING_ROWS} rows, got {b}")
    block_b = triton.next_power_of_2(b)
    added = torch.empty(block_b, dtype=torch.float32, device=values.device)
    removed = torch.empty_like(added)
    n_kept = torch.empty((), dtype=torch.long, device=values.device)
    _ring_add_op(values.contiguous(), active, buffer, ptr, count, added, removed, n_kept)
    return added, removed, n_kept


# ----------------------------------------------------------------------------- merge
@triton.jit
def _count_below(X, n, x, STEPS: tl.constexpr, INCLUSIVE: tl.constexpr):
    """For each element of x: #{m < n : X[m] < x} (INCLUSIVE: X[m] <= x), X ascending.

    Binary lifting: STEPS fixed steps of halving strides (2^STEPS > n), each one masked load,
    so every lane runs the same unrolled code. n: scalar, x: a tensor (or scalar); int32 out.
    """
    pos = tl.zeros_like(x).to(tl.int32)
    for s in tl.static_range(STEPS):
        cand = pos + (1 << (STEPS - 1 - s))
        ok = cand <= n
        y = tl.load(X + (cand - 1), mask=ok, other=0.0)
        if INCLUSIVE:
            hit = y <= x
        else:
            hit = y < x
        pos = tl.where(ok & hit, cand, pos)
    return pos


@triton.jit
def _merge_window_kernel(
    S, A, R, N_KEPT, OUT, N,
    BLOCK: tl.constexpr, BLOCK_B: tl.constexpr, STEPS_B: tl.constexpr, STEPS_T: tl.constexpr,
):  # fmt: skip
    """One tile of old values S[t0:t1] and the new values that land inside it.

    Grid: (cdiv(N, BLOCK),). S: (N,) old sorted values; A, R: added and removed values
    (ascending, first N_KEPT valid); OUT: (N,). STEPS_B = bit_length(B): searches in A and R;
    STEPS_T = bit_length(BLOCK): searches inside a tile.
    """
    pid = tl.program_id(0)
    t0 = pid * BLOCK
    t1 = tl.minimum(t0 + BLOCK, N)
    k = tl.load(N_KEPT).to(tl.int32)

    # Old values: drop the removed copies, shift the rest by (#added <= v) - (#removed <= v).
    j = t0 + tl.arange(0, BLOCK)
    inside = j < N
    v = tl.load(S + j, mask=inside, other=float("inf"))
    le_r = _count_below(R, k, v, STEPS_B, True)
    lt_r = _count_below(R, k, v, STEPS_B, False)
    le_a = _count_below(A, k, v, STEPS_B, True)
    eq_r = le_r - lt_r
    first = j - eq_r  # v is removed iff it is among the first eq_r copies of its run
    prev = tl.load(S + first, mask=inside & (eq_r > 0) & (first >= 0), other=float("-inf"))
    removed = (eq_r > 0) & ((first < 0) | (prev < v))
    pos = j - le_r + le_a
    # Positions leave [0, N) only for inputs outside the contract (removed values that are not
    # old ones, NaN); masked, so such a bug garbles the window instead of other memory.
    tl.store(OUT + pos, v, mask=inside & ~removed & (pos >= 0) & (pos < N))

    # New values with S[t0 - 1] < w <= S[t1 - 1] (the last tile also takes every w above
    # S[N - 1]): #old < w is t0 plus a search in this tile only.
    edge = tl.load(S + tl.maximum(t0 - 1, 0))
    lo = tl.where(t0 > 0, _count_below(A, k, edge, STEPS_B, True), 0)
    hi = tl.where(t1 == N, k, tl.max(tl.where(inside, le_a, 0), axis=0))  # le_a ascends in j
    for start in range(lo, hi, BLOCK_B):  # one round unless more than BLOCK_B land here
        i = start + tl.arange(0, BLOCK_B)
        ok = i < hi
        w = tl.load(A + i, mask=ok, other=0.0)
        lt_old = t0 + _count_below(S + t0, t1 - t0, w, STEPS_T, False)
        lt_rw = _count_below(R, k, w, STEPS_B, False)
        at = lt_old - lt_rw + i
        tl.store(OUT + at, w, mask=ok & (at >= 0) & (at < N))


@torch.library.custom_op("mtrl::merge_window", mutates_args=("out",))
def _merge_window_op(
    sorted_values: torch.Tensor,
    added: torch.Tensor,
    removed: torch.Tensor,
    n_kept: torch.Tensor,
    out: torch.Tensor,
    block: int,
) -> None:
    n, b = sorted_values.shape[0], added.shape[0]
    _merge_window_kernel[(triton.cdiv(n, block),)](
        sorted_values, added, removed, n_kept, out, n,
        BLOCK=block, BLOCK_B=min(block, triton.next_power_of_2(b)), STEPS_B=b.bit_length(),
        STEPS_T=block.bit_length(), num_warps=NUM_WARPS,
    )  # fmt: skip


@_merge_window_op.register_fake
def _(sorted_values, added, removed, n_kept, out, block):
    return None


def _check(sorted_values, added, removed, n_kept, out) -> None:
    n = sorted_values.shape[0]
    if added.shape != removed.shape or added.dim() != 1:
        raise ValueError(
            f"merge_window: added and removed must be (B,), got {tuple(added.shape)} and "
            f"{tuple(removed.shape)}"
        )
    if sorted_values.dim() != 1 or out.shape != sorted_values.shape:
        raise ValueError(
            f"merge_window: sorted_values and out must be (N,), got "
            f"{tuple(sorted_values.shape)} and {tuple(out.shape)}"
        )
    for name, t in (("sorted_values", sorted_values), ("added", added), ("removed", removed)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"merge_window: {name} must be contiguous fp32")
    if n_kept.numel() != 1 or n_kept.dtype.is_floating_point:
        raise ValueError("merge_window: n_kept must be a one-element integer tensor")
    if n >= 2**31 - 1:
        raise ValueError(f"merge_window: at most 2^31 - 2 values (int32 positions), got {n}")


def merge_window(
    sorted_values: torch.Tensor,
    added: torch.Tensor,
    removed: torch.Tensor,
    n_kept: torch.Tensor,
    out: torch.Tensor,
    *,
    block: int | None = None,
) -> None:
    """``out = sort(sorted_values - removed[:n_kept] + added[:n_kept])``; see the module doc.

    One launch, no host sync. ``block``: old values per program (a power of two >= 16;
    default ``BLOCK``, which the tests make small to get many tiles).
    """
    _check(sorted_values, added, removed, n_kept, out)
    block = BLOCK if block is None else int(block)
    if block < 16 or block & (block - 1):
        raise ValueError(f"merge_window: block must be a power of two >= 16, got {block}")
    if sorted_values.shape[0] == 0 or added.shape[0] == 0:
        out.copy_(sorted_values)
        return
    _merge_window_op(sorted_values, added, removed, n_kept, out, block)


def merge_window_reference(
    sorted_values: torch.Tensor,
    added: torch.Tensor,
    removed: torch.Tensor,
    n_kept: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """``merge_window`` as torch ops (``searchsorted`` for the counts): the CPU path and the
    kernel's oracle. No host sync either. The counts run over the whole (B,) ``added`` and
    ``removed`` and are clamped to ``n_kept``: their ``+inf`` tails only ever add to a count
    that already includes all n_kept (a search for ``+inf``), so the clamp removes them."""
    _check(sorted_values, added, removed, n_kept, out)
    n, b = sorted_values.shape[0], added.shape[0]
    k = n_kept.reshape(()).long()
    j = torch.arange(n, device=sorted_values.device)
    le_r = torch.searchsorted(removed, sorted_values, right=True).clamp(max=k)
    lt_r = torch.searchsorted(removed, sorted_values).clamp(max=k)
    le_a = torch.searchsorted(added, sorted_values, right=True).clamp(max=k)
    eq_r = le_r - lt_r
    first = j - eq_r
    prev = sorted_values.gather(0, first.clamp(min=0))
    gone = (eq_r > 0) & ((first < 0) | (prev < sorted_values))
    i = torch.arange(b, device=sorted_values.device)
    lt_old = torch.searchsorted(sorted_values, added)
    lt_rw = torch.searchsorted(removed, added).clamp(max=k)
    # position n is a sink for the removed old values and the padding of added
    merged = sorted_values.new_empty(n + 1)
    merged.scatter_(0, torch.where(gone, n, j - le_r + le_a), sorted_values)
    merged.scatter_(0, torch.where(i < k, lt_old - lt_rw + i, n), added)
    out.copy_(merged[:n])
