"""Fused Triton kernels for the sampler's two passes over the (batch, vocab) logits.

    entropies = fused_entropy(logits)                          # step 1: entropy at T = 1
    entropies, row_max = fused_entropy(logits, return_max=True)
    tokens, logprobs = fused_draw(logits, temperatures, seed)  # step 5 (no top-k / top-p)

Why: inductor's kernels for the sampler read the (batch, vocab) logits or an fp32 copy about
8 times per decode step (softmax + entropy, the scaled copy, the noise tensor ``exponential_``
writes, softmax, ratio, argmax). Here step 1 reads the logits once and step 5 reads them once
more, in their own dtype, with the Exp(1) noise made in registers.

Both kernels split the vocabulary into chunks of ``CHUNK`` columns, one program per (row,
chunk), so that a decode batch of 64 rows still fills the GPU (a vocabulary below ``TILE``
columns gets several rows per program instead); each program writes a few per-chunk partials,
and the last chunk of a row to finish merges the row's (an arrival counter, ``mtrl.arrivals``),
so each pass is one launch:

- entropy: per chunk the max ``m``, ``s = sum exp(x - m)`` and ``t = sum exp(x - m) (x - m)``;
  combined, ``H = log S - T / S``. ``-inf`` logits contribute 0; a row with NaN, ``+inf`` or no
  finite logit gets a NaN entropy, as ``token_entropy`` does (the sampler's NaN check reads it).
- draw: the exponential race ``argmax_i p_i / E_i``, E_i ~ Exp(1), which is exactly a draw
  from ``p = softmax(x / T)``; per chunk the max ``m`` of ``x / T``, the ``exp(x / T - m)``
  that its logsumexp sums anyway divided by E, the best (``m + log`` of that ratio, column),
  so the log-prob of the token,
  ``x_tok / T - logsumexp(x / T)``, comes out of the same pass. With ``min_p``, tokens with
  ``x / T < max(x) / T + log(min_p)`` are dropped first (the sampler's ``truncate``; the row max
  comes from the entropy pass). Masked (``-inf``) logits never win.

Random numbers: ``seed`` is a 0-dim int64 tensor that the kernel loads from memory, so a CUDA
graph replay draws fresh noise when the caller refreshes the seed on the device each call (the
sampler draws it with ``torch.randint`` on its generator inside the graph). Uniforms come from
Triton's Philox (``tl.randint4x``, 10 rounds, key = the seed, counter = ``(row * chunks +
chunk) * CHUNK / 4 + j``; its four outputs serve four columns ``j + k * CHUNK / 4``). The 32
random bits become ``u = (bits + 0.5) / 2**32`` in (0, 1) and ``E = -log(1 - u)``, with a
series for u < 1/16 so that small E, the ones that decide a race, keep 2^-32 resolution (the
``-log(U)`` of a float uniform has only 2^-24 there); E = 0, a certain win, never occurs. This is
a different random stream than ``torch.Tensor.exponential_``; the draws follow the same law.

Cost, measured on an H100 at batch 64 x vocab 151936 inside the rollout engine's CUDA graph
(bench/results/rollout_kernels.md): entropy 14.5 us, draw 41.1 us, one launch each (before the
merges moved into the passes, the draw took 43.4 us plus 11.7 us for a combine kernel), against
about 0.25 ms a step for inductor's kernels of the torch path. The draw is bound by arithmetic
(a quarter of a 10-round Philox call, a log, an exp and a division per column), not by its one
read of the logits (about 6.5 us).

``noise=`` (a (batch, vocab) fp32 tensor of Exp(1) values) replaces the in-kernel noise; the
tests use it to compare with ``draw_reference`` token for token.

Triton runs the kernels on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mtrl.arrivals import arrival_counters, last_to_arrive
from mtrl.sampling.entropy import token_entropy

CHUNK = 4096  # vocabulary columns per program: 38 chunks x 64 rows at Qwen's 151936
TILE = 4096  # elements per program: small vocabularies get several rows per program


def _plan(batch: int, vocab: int, chunk: int | None) -> tuple[int, int, int]:
    """(columns per program, chunks per row, rows per program)."""
    chunk = CHUNK if chunk is None else int(chunk)
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk: must be a power of two >= 16, got {chunk}")
    block = max(16, min(chunk, triton.next_power_of_2(vocab)))
    rows = max(1, min(TILE // block, triton.next_power_of_2(batch)))
    return block, triton.cdiv(vocab, block), rows


def _num_warps(elements: int) -> int:
    return 8 if elements >= 4096 else 4


def _rows(logits: torch.Tensor, name: str) -> torch.Tensor:
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"{name}: logits must be (batch, vocab), got {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"{name}: logits must be floating point, got {logits.dtype}")
    return logits if logits.stride(1) == 1 else logits.contiguous()


# ----------------------------------------------------------------------------- entropy
@triton.jit
def _entropy_chunk_kernel(
    X, M, S, T, H, MAX, INVALID, ARRIVED, sx, B, V, n_chunks,
    ROWS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, HAS_INVALID: tl.constexpr,
):  # fmt: skip
    """ROWS rows x one chunk: m = max x, s = sum exp(x - m), t = sum exp(x - m) (x - m).

    The last chunk of the rows to arrive (ARRIVED, one count per program row) merges them."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = rows < B
    rows = rows.to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = ok[:, None] & (cols < V)[None, :]
    x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=valid, other=float("-inf"))
    x = x.to(tl.float32)
    m = tl.max(x, 1)
    masked = x == float("-inf")
    d = tl.where(masked, float("-inf"), x - m[:, None])  # not -inf - -inf in an all -inf chunk
    e = tl.exp(d)
    out = rows * n_chunks + chunk
    tl.store(M + out, m, mask=ok)
    tl.store(S + out, tl.sum(e, 1), mask=ok)
    tl.store(T + out, tl.sum(tl.where(masked, 0.0, e * d), 1), mask=ok)
    if last_to_arrive(ARRIVED + tl.program_id(0), n_chunks):
        _entropy_merge(M, S, T, H, MAX, INVALID, rows, ok, n_chunks, BLOCK_C, HAS_INVALID)


@triton.jit
def _entropy_merge(
    M, S, T, H, MAX, INVALID, rows, ok, n_chunks, BLOCK_C: tl.constexpr, HAS_INVALID: tl.constexpr
):  # fmt: skip
    """H = log S - T / S over the chunks' partials, rescaled to the row max; HAS_INVALID: set
    the flag INVALID when an H is not finite. The partials were written by other programs:
    loads go through L2 (".cg"), not this SM's L1."""
    c = tl.arange(0, BLOCK_C)
    at = rows[:, None] * n_chunks + c[None, :]
    valid = ok[:, None] & (c < n_chunks)[None, :]
    m = tl.load(M + at, mask=valid, other=float("-inf"), cache_modifier=".cg")
    s = tl.load(S + at, mask=valid, other=0.0, cache_modifier=".cg")
    t = tl.load(T + at, mask=valid, other=0.0, cache_modifier=".cg")
    mx = tl.max(m, 1)
    empty = m == float("-inf")  # chunks with no finite logit add nothing
    shift = tl.where(empty, 0.0, m - mx[:, None])
    w = tl.where(empty, 0.0, tl.exp(shift))
    s_row = tl.sum(w * s, 1)
    t_row = tl.sum(w * (t + shift * s), 1)
    # no finite logit: s_row = 0 -> log 0 - 0 / 0 = NaN; NaN or +inf propagate through s, t
    h = tl.log(s_row) - t_row / s_row
    tl.store(H + rows, h, mask=ok)
    tl.store(MAX + rows, mx, mask=ok)
    if HAS_INVALID:  # NaN fails the comparison
        tl.store(INVALID + 0 * rows, 1, mask=ok & ~(tl.abs(h) < float("inf")))


def fused_entropy(
    logits: torch.Tensor,
    *,
    return_max: bool = False,
    invalid: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Entropy in nats of ``softmax(logits.float())`` per row, (batch,) fp32.

    Same values as ``token_entropy`` (to fp32 rounding): ``-inf`` logits contribute 0, rows with
    NaN, ``+inf`` or no finite logit give NaN. ``return_max=True`` also returns each row's max
    logit in fp32 (what ``fused_draw``'s min-p needs). ``invalid``: a one-element bool tensor
    on the logits' device, set to True (never back to False) when a row's entropy is not
    finite: the sampler's deferred NaN check, without kernels of its own. ``chunk``: columns
    per program (a power of two; tests use small ones).
    """
    x = _rows(logits, "fused_entropy")
    batch, vocab = x.shape
    if invalid is not None and (
        invalid.numel() != 1 or invalid.dtype != torch.bool or invalid.device != x.device
    ):
        raise ValueError(
            "fused_entropy: invalid must be a one-element bool tensor on the logits' device"
        )
    block, n_chunks, rows = _plan(batch, vocab, chunk)
    m, s, t = torch.empty((3, batch, n_chunks), dtype=torch.float32, device=x.device)
    entropy = torch.empty(batch, dtype=torch.float32, device=x.device)
    row_max = torch.empty(batch, dtype=torch.float32, device=x.device)
    if batch == 0:
        return (entropy, row_max) if return_max else entropy
    grid = (triton.cdiv(batch, rows), n_chunks)
    _entropy_chunk_kernel[grid](
        x, m, s, t, entropy, row_max, entropy if invalid is None else invalid,
        arrival_counters(x.device, grid[0], "fused_entropy"), x.stride(0), batch, vocab, n_chunks,
        ROWS=rows, CHUNK=block, BLOCK_C=triton.next_power_of_2(n_chunks),
        HAS_INVALID=invalid is not None, num_warps=_num_warps(rows * block),
    )  # fmt: skip
    return (entropy, row_max) if return_max else entropy


def fused_entropy_reference(logits: torch.Tensor) -> torch.Tensor:
    """The oracle of ``fused_entropy``: the sampler's eager ``token_entropy``."""
    return token_entropy(logits)


# ----------------------------------------------------------------------------- draw
@triton.jit
def _exponential(bits):
    """Exp(1) from 32 random bits: u = (bits + 0.5) / 2^32 in (0, 1), E = -log(1 - u)."""
    u = bits.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
    u = tl.minimum(u, 0.99999994)  # bits near 2^32 round to u = 1 in fp32: keep E finite
    # -log1p(-u) = u + u^2/2 + ...: exact to fp32 for u < 1/16 (next term < u * 2^-24 / 7)
    series = u * (1.0 + u * (0.5 + u * (1.0 / 3 + u * (0.25 + u * (0.2 + u * (1.0 / 6))))))
    return tl.where(u < 0.0625, series, -tl.log(1.0 - u))


@triton.jit
def _race_tile(
    X, NOISE, rows, ok, sx, V, cols, bits, temp, cutoff,
    HAS_NOISE: tl.constexpr, HAS_MIN_P: tl.constexpr,
):  # fmt: skip
    """Tempered logits t = x / T (min-p dropped to -inf) and the Exp(1) noise E of a tile."""
    valid = ok & (cols < V)
    x = tl.load(X + rows * sx + cols, mask=valid, other=float("-inf")).to(tl.float32)
    t = x / temp
    if HAS_MIN_P:
        t = tl.where(t < cutoff, float("-inf"), t)
    if HAS_NOISE:
        e = tl.load(NOISE + rows * V + cols, mask=valid, other=1.0)
    else:
        e = _exponential(bits)
    return t, e


@triton.jit
def _unnormalised(t, m):
    """exp(t - m), 0 where t = -inf (also when the whole chunk is and m = -inf)."""
    return tl.where(t == float("-inf"), 0.0, tl.exp(t - m))


@triton.jit
def _pick(best, best_col, score, cols):
    better = score > best
    return tl.where(better, score, best), tl.where(better, cols, best_col)


@triton.jit
def _draw_chunk_kernel(
    X, TEMP, SEED, NOISE, ROW_MAX, BEST, BEST_COL, M, S, TOKENS, LOGPROBS, ARRIVED,
    sx, st, B, V, n_chunks, log_min_p,
    ROWS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, HAS_NOISE: tl.constexpr,
    HAS_MIN_P: tl.constexpr,
):  # fmt: skip
    """ROWS rows x one chunk: m = max t, p = exp(t - m), s = sum p, and the race's best
    (m + log(p / E), column); the last chunk of the rows to arrive merges them."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = rows < B
    rows = rows.to(tl.int64)
    chunk = tl.program_id(1)
    Q: tl.constexpr = CHUNK // 4
    j = tl.arange(0, Q)[None, :]
    base = chunk * CHUNK + j
    temp = tl.load(TEMP + rows * st, mask=ok, other=1.0)
    cutoff = temp  # unused without min-p
    if HAS_MIN_P:
        cutoff = tl.load(ROW_MAX + rows, mask=ok, other=0.0) / temp + log_min_p
    r, r_ok, temp, cutoff = rows[:, None], ok[:, None], temp[:, None], cutoff[:, None]
    if HAS_NOISE:
        b0, b1, b2, b3 = j, j, j, j  # unused: the noise comes from NOISE
    else:
        # four blocks of random bits per Philox call, one per quarter of the chunk
        b0, b1, b2, b3 = tl.randint4x(tl.load(SEED), (r * n_chunks + chunk) * Q + j)
    t0, e0 = _race_tile(X, NOISE, r, r_ok, sx, V, base, b0, temp, cutoff, HAS_NOISE, HAS_MIN_P)
    t1, e1 = _race_tile(X, NOISE, r, r_ok, sx, V, base + Q, b1, temp, cutoff, HAS_NOISE, HAS_MIN_P)
    t2, e2 = _race_tile(
        X, NOISE, r, r_ok, sx, V, base + 2 * Q, b2, temp, cutoff, HAS_NOISE, HAS_MIN_P
    )
    t3, e3 = _race_tile(
        X, NOISE, r, r_ok, sx, V, base + 3 * Q, b3, temp, cutoff, HAS_NOISE, HAS_MIN_P
    )
    m = tl.maximum(
        tl.maximum(tl.max(t0, 1), tl.max(t1, 1)), tl.maximum(tl.max(t2, 1), tl.max(t3, 1))
    )
    p0 = _unnormalised(t0, m[:, None])
    p1 = _unnormalised(t1, m[:, None])
    p2 = _unnormalised(t2, m[:, None])
    p3 = _unnormalised(t3, m[:, None])
    # The race argmax p / E shares the exp of the logsumexp: one log a column (E's) instead of
    # scores t - log E. A column with p = 0 under the chunk max cannot win: the largest ratio
    # of two E is about 1e11 (E in [2.3e-10, 22]), far inside fp32's exp range.
    best, col = _pick(tl.fdiv(p0, e0), base, tl.fdiv(p1, e1), base + Q)
    best, col = _pick(best, col, tl.fdiv(p2, e2), base + 2 * Q)
    best, col = _pick(best, col, tl.fdiv(p3, e3), base + 3 * Q)
    ratio, i = tl.max(best, 1, return_indices=True)
    out = rows * n_chunks + chunk
    tl.store(BEST + out, m + tl.log(ratio), mask=ok)  # comparable across the row's chunks
    tl.store(BEST_COL + out, tl.sum(tl.where(j == i[:, None], col, 0), 1), mask=ok)
    tl.store(M + out, m, mask=ok)
    tl.store(S + out, tl.sum(p0 + p1 + p2 + p3, 1), mask=ok)
    if last_to_arrive(ARRIVED + tl.program_id(0), n_chunks):
        _draw_merge(
            X, TEMP, BEST, BEST_COL, M, S, TOKENS, LOGPROBS, rows, ok, sx, st, V, n_chunks,
            BLOCK_C,
        )  # fmt: skip


@triton.jit
def _draw_merge(
    X, TEMP, BEST, BEST_COL, M, S, TOKENS, LOGPROBS, rows, ok, sx, st, V, n_chunks,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The winning chunk's column, and log p = x_tok / T - logsumexp(x / T); partials
    through L2 (".cg"), as in ``_entropy_merge``."""
    c = tl.arange(0, BLOCK_C)[None, :]
    at = rows[:, None] * n_chunks + c
    valid = ok[:, None] & (c < n_chunks)
    best = tl.load(BEST + at, mask=valid, other=float("-inf"), cache_modifier=".cg")
    cols = tl.load(BEST_COL + at, mask=valid, other=0, cache_modifier=".cg")
    _, i = tl.max(best, 1, return_indices=True)
    tok = tl.sum(tl.where(c == i[:, None], cols, 0), 1)
    # in range even for rows of NaN (flagged by the entropy check): no gather downstream faults
    tok = tl.minimum(tl.maximum(tok, 0), V - 1)
    m = tl.load(M + at, mask=valid, other=float("-inf"), cache_modifier=".cg")
    s = tl.load(S + at, mask=valid, other=0.0, cache_modifier=".cg")
    mx = tl.max(m, 1)
    s_row = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - mx[:, None])), 1)
    temp = tl.load(TEMP + rows * st, mask=ok, other=1.0)
    t_tok = tl.load(X + rows * sx + tok, mask=ok, other=0.0).to(tl.float32) / temp
    tl.store(TOKENS + rows, tok.to(tl.int64), mask=ok)
    tl.store(LOGPROBS + rows, t_tok - (mx + tl.log(s_row)), mask=ok)


def fused_draw(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    seed: torch.Tensor | None,
    noise: torch.Tensor | None = None,
    *,
    min_p: float = 0.0,
    row_max: torch.Tensor | None = None,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from ``softmax(logits.float() / temperatures[:, None])``.

    Returns ``tokens`` (batch,) long and ``logprobs`` (batch,) fp32, the log-prob of each token
    under that (min-p truncated) distribution.

    - ``seed``: 0-dim int64 tensor on the logits' device, read by the kernel (not a Python
      int), so each replay of a captured graph uses whatever seed was written before it.
      Ignored (may be None) when ``noise`` is given.
    - ``noise``: optional (batch, vocab) fp32 Exp(1) values used instead of the in-kernel ones.
    - ``min_p``: drop tokens with ``p < min_p * p_max`` after the temperature; needs each row's
      max logit (``row_max``, from ``fused_entropy(..., return_max=True)``; computed here if
      not given, one more pass).
    """
    x = _rows(logits, "fused_draw")
    batch, vocab = x.shape
    temps = temperatures.to(device=x.device, dtype=torch.float32)
    if temps.shape != (batch,):
        raise ValueError(f"fused_draw: temperatures must be ({batch},), got {tuple(temps.shape)}")
    has_noise = noise is not None
    if has_noise:
        if noise.shape != x.shape:
            raise ValueError(
                f"fused_draw: noise must be {tuple(x.shape)}, got {tuple(noise.shape)}"
            )
        noise = noise.to(device=x.device, dtype=torch.float32).contiguous()
    elif seed is None or seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != x.device:
        raise ValueError(
            "fused_draw: seed must be a one-element int64 tensor on the logits' device"
        )
    has_min_p = min_p > 0.0
    if has_min_p and row_max is None:
        row_max = x.amax(dim=1).float()
    block, n_chunks, rows = _plan(batch, vocab, chunk)
    best, m, s = torch.empty((3, batch, n_chunks), dtype=torch.float32, device=x.device)
    best_col = torch.empty((batch, n_chunks), dtype=torch.int32, device=x.device)
    tokens = torch.empty(batch, dtype=torch.long, device=x.device)
    logprobs = torch.empty(batch, dtype=torch.float32, device=x.device)
    if batch == 0:
        return tokens, logprobs
    unused = logprobs  # stands in for the pointers a constexpr flag leaves unread
    grid = (triton.cdiv(batch, rows), n_chunks)
    _draw_chunk_kernel[grid](
        x, temps, tokens if has_noise else seed, noise if has_noise else unused,
        row_max if has_min_p else unused, best, best_col, m, s, tokens, logprobs,
        arrival_counters(x.device, grid[0], "fused_draw"),
        x.stride(0), temps.stride(0), batch, vocab, n_chunks,
        math.log(min_p) if has_min_p else 0.0,
        ROWS=rows, CHUNK=block, BLOCK_C=triton.next_power_of_2(n_chunks), HAS_NOISE=has_noise,
        HAS_MIN_P=has_min_p, num_warps=_num_warps(rows * block),
    )  # fmt: skip
    return tokens, logprobs


def draw_reference(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    noise: torch.Tensor,
    min_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle of ``fused_draw`` given its noise, written as the sampler's eager draw."""
    from mtrl.sampling.sampler import truncate

    scaled = logits.float() / temperatures.float()[:, None]
    scaled = truncate(scaled, min_p=min_p)
    probs = torch.softmax(scaled, dim=-1)
    tokens = torch.argmax(probs / noise, dim=-1)
    logprobs = torch.log_softmax(scaled, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs
