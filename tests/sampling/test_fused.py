"""Fused sampler kernels (mtrl.sampling.fused) against their PyTorch references.

CPU: the Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before this import) on awkward shapes: vocab not a multiple of the chunk,
several chunks per row, several rows per program, -inf entries, a row with one finite logit,
fp32/fp16/bf16 logits. GPU (marked ``gpu``): bf16 at Qwen's vocabulary, the sampler captured
in a CUDA graph and replayed.
"""

import os

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from mtrl.arrivals import _COUNTERS
from mtrl.sampling import MultiTemperatureConfig, MultiTemperatureSampler, token_entropy
from mtrl.sampling.fused import draw_reference, fused_draw, fused_entropy
from mtrl.sampling.sampler import truncate

DEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
pytestmark = [
    pytest.mark.skipif(
        DEV == "cpu" and not INTERPRET, reason="Triton needs a GPU or TRITON_INTERPRET=1"
    ),
    # numpy's warnings inside the interpreter for the masked lanes' inf - inf, 0 * inf, log 0
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]
NEG = float("-inf")
# (batch, vocab, chunk): one chunk; two chunks with a short last one; rows of 4 chunks with 16
# rows per program (batch 7 leaves 9 of them masked); one row of 5 chunks
SHAPES = [(1, 1000, None), (3, 5003, None), (7, 1000, 256), (1, 5003, 1024)]


def _logits(batch, vocab, dtype=torch.float32, seed=0):
    """~N(0, 3^2) logits; row 0 has a masked block, row 1 one finite logit (when batch > 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, vocab, generator=g) * 3
    x[0, 100:400] = NEG
    if batch > 1:
        x[1] = NEG
        x[1, vocab - 2] = 1.5
    return x.to(dtype).to(DEV)


def _seed(value):
    return torch.tensor(value, dtype=torch.int64, device=DEV)


def _temperatures(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (0.3 + 1.5 * torch.rand(batch, generator=g)).to(DEV)


def _log_softmax_at(logits, temperatures, tokens, min_p=0.0):
    scaled = truncate(logits.float() / temperatures[:, None], min_p=min_p)
    return torch.log_softmax(scaled, -1).gather(1, tokens[:, None]).squeeze(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch, vocab, chunk", SHAPES)
def test_entropy_matches_token_entropy(batch, vocab, chunk, dtype):
    x = _logits(batch, vocab, dtype)
    entropy, row_max = fused_entropy(x, return_max=True, chunk=chunk)
    assert entropy.dtype == torch.float32 and entropy.shape == (batch,)
    torch.testing.assert_close(entropy, token_entropy(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(row_max, x.float().amax(1))
    if batch > 1:
        assert float(entropy[1]) == 0.0  # one finite logit: a certain token


def test_entropy_of_invalid_rows_is_not_finite():
    x = torch.randn(4, 300)
    x[0, 7] = float("nan")
    x[1, 250] = float("inf")
    x[2] = NEG
    x = x.to(DEV)
    for chunk in (None, 64):
        entropy = fused_entropy(x, chunk=chunk)
        assert torch.equal(torch.isfinite(entropy), torch.isfinite(token_entropy(x)))
        assert torch.isfinite(entropy).tolist() == [False, False, False, True]
    # the deferred check's flag: set by an invalid row, left alone by finite ones
    flag = torch.zeros((), dtype=torch.bool, device=DEV)
    fused_entropy(x[3:], invalid=flag, chunk=64)
    assert not bool(flag)
    fused_entropy(x, invalid=flag, chunk=64)
    assert bool(flag)
    fused_entropy(x[3:], invalid=flag)
    assert bool(flag)  # never set back
    # a strided view (a step's last-position logits) reads the same as its copy
    wide = torch.randn(3, 2, 300, device=DEV)
    torch.testing.assert_close(fused_entropy(wide[:, -1]), token_entropy(wide[:, -1]))


def test_merge_counters_are_left_zero():
    """Each pass's chunks count themselves in and the last one merges and resets the count:
    after passes with different chunk counts the counters are all zero and a repeat gives the
    same bits."""
    x = _logits(5, 300, torch.float32)
    temps = torch.full((5,), 0.7, device=DEV)
    noise = torch.empty(5, 300, device=DEV).exponential_()
    runs = [
        (fused_entropy(x, chunk=c), *fused_draw(x, temps, None, noise, chunk=c))
        for c in (64, 16, 64)
    ]
    assert not _COUNTERS[x.device].any()
    for a, b in zip(runs[0], runs[2], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("min_p", [0.0, 0.05])
@pytest.mark.parametrize("batch, vocab, chunk", SHAPES)
def test_draw_with_given_noise_matches_reference(batch, vocab, chunk, min_p):
    x = _logits(batch, vocab, seed=2)
    temps = _temperatures(batch)
    noise = torch.empty(batch, vocab).exponential_(generator=torch.Generator().manual_seed(3))
    noise = noise.to(DEV)
    _, row_max = fused_entropy(x, return_max=True, chunk=chunk)
    tokens, logprobs = fused_draw(x, temps, None, noise, min_p=min_p, row_max=row_max, chunk=chunk)
    ref_tokens, ref_logprobs = draw_reference(x, temps, noise, min_p=min_p)
    assert tokens.dtype == torch.long and logprobs.dtype == torch.float32
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logprobs, ref_logprobs, atol=1e-5, rtol=1e-5)
    assert torch.all(torch.isfinite(x[torch.arange(batch), tokens]))
    if batch > 1:
        assert int(tokens[1]) == vocab - 2 and float(logprobs[1]) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, vocab, chunk", SHAPES)
def test_in_kernel_noise_logprob_is_that_of_the_token(batch, vocab, chunk, dtype):
    x = _logits(batch, vocab, dtype, seed=4)
    temps = _temperatures(batch, seed=5)
    tokens, logprobs = fused_draw(x, temps, _seed(17), chunk=chunk)
    assert tokens.shape == (batch,) and bool(((tokens >= 0) & (tokens < vocab)).all())
    assert torch.all(torch.isfinite(x[torch.arange(batch), tokens].float()))  # never a -inf one
    torch.testing.assert_close(logprobs, _log_softmax_at(x, temps, tokens), atol=1e-5, rtol=1e-5)


def _pooled_chisquare(counts, probs):
    expected = probs * counts.sum()
    keep = expected >= 5
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


@pytest.mark.parametrize("min_p", [0.0, 0.08])
def test_draw_frequencies_follow_tempered_softmax(min_p):
    """20k rows of the same 8 logits: half drawn at T = 0.7, half at T = 1.6, one seed."""
    draws = 10_000
    row = torch.tensor([2.0, 1.2, 0.5, 0.0, -0.5, NEG, -1.5, 1.0])
    x = row.repeat(2 * draws, 1).to(DEV)
    temps = torch.tensor([0.7, 1.6]).repeat_interleave(draws).to(DEV)
    tokens, logprobs = fused_draw(x, temps, _seed(2024), min_p=min_p)
    tokens = tokens.view(2, draws).cpu()
    for half, t, other in ((0, 0.7, 1.6), (1, 1.6, 0.7)):
        counts = np.bincount(tokens[half].numpy(), minlength=8)
        probs = torch.softmax(truncate(row[None] / t, min_p=min_p).double(), -1)[0].numpy()
        assert counts[probs == 0].sum() == 0, "a masked or min-p-dropped token was drawn"
        assert _pooled_chisquare(counts, probs) > 1e-3
        wrong = torch.softmax(truncate(row[None] / other, min_p=min_p).double(), -1)[0].numpy()
        assert _pooled_chisquare(counts, wrong) < 1e-6  # power: the other temperature is rejected
    expected = _log_softmax_at(x, temps, tokens.flatten().to(DEV), min_p=min_p)
    torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=1e-5)


def test_seed_decides_the_draw():
    x = torch.randn(16, 3000, generator=torch.Generator().manual_seed(6)).to(DEV)
    temps = torch.ones(16, device=DEV)
    a, lp_a = fused_draw(x, temps, _seed(1))
    b, lp_b = fused_draw(x, temps, _seed(1))
    c, _ = fused_draw(x, temps, _seed(2))
    assert torch.equal(a, b) and torch.equal(lp_a, lp_b)
    assert (a != c).sum() >= 12  # flat rows: two seeds agree on a row with p ~ 1e-3


def test_arguments():
    empty = torch.zeros(0, 50, device=DEV)
    assert fused_entropy(empty).shape == (0,)
    assert fused_draw(empty, torch.ones(0, device=DEV), _seed(0))[0].shape == (0,)
    x = torch.randn(2, 50, device=DEV)
    with pytest.raises(ValueError, match="seed"):
        fused_draw(x, torch.ones(2, device=DEV), None)
    with pytest.raises(ValueError, match="temperatures"):
        fused_draw(x, torch.ones(3, device=DEV), _seed(0))
    with pytest.raises(ValueError, match="batch, vocab"):
        fused_entropy(x[0])
    with pytest.raises(ValueError, match="chunk"):
        fused_entropy(x, chunk=100)


# ----------------------------------------------------------------------------- sampler
def test_sampler_chooses_the_path():
    assert MultiTemperatureSampler(fused=True).uses_fused(DEV)
    assert not MultiTemperatureSampler(fused=False).uses_fused(DEV)
    assert MultiTemperatureSampler().uses_fused(DEV) == (DEV == "cuda")  # auto: on CUDA only
    assert MultiTemperatureSampler(MultiTemperatureConfig(min_p=0.1), fused=True).uses_fused(DEV)
    for truncation in (dict(top_p=0.9), dict(top_k=20)):  # not fused: fall back to torch
        cfg = MultiTemperatureConfig(**truncation)
        assert not MultiTemperatureSampler(cfg, fused=True).uses_fused(DEV)


@pytest.mark.parametrize(
    "settings",
    [
        dict(mode="multi", threshold_mode="window", window_size=40, reasoning_fraction=0.3),
        dict(mode="single", temperature=0.9, threshold_mode="batch", min_p=0.02),
        dict(mode="multi", threshold_mode="fixed", entropy_threshold=5.0, offsets_apply_to="all"),
    ],
)
def test_sampler_fused_path_matches_torch_path(settings):
    """Same entropies, thresholds, classes, temperatures and window; log-probs of each path's
    own tokens (the random streams differ)."""

    def run(fused: bool):
        cfg = MultiTemperatureConfig(high_temperature=1.4, low_temperature=0.6, **settings)
        gen = torch.Generator(device=DEV).manual_seed(0)
        sampler = MultiTemperatureSampler(cfg, generator=gen, fused=fused)
        assert sampler.uses_fused(DEV) == fused
        data = torch.Generator().manual_seed(3)
        active = torch.tensor([True, True, False, True, True, True], device=DEV)
        out = []
        for i in range(3):
            logits = torch.randn(6, 700, generator=data) * (1 + i)
            logits[1, :650] = NEG
            logits = logits.to(DEV)
            out.append((logits, sampler(logits, active, torch.linspace(0, 0.3, 6, device=DEV))))
        return out, sampler.window

    torch_steps, torch_window = run(False)
    fused_steps, fused_window = run(True)
    for (logits, e), (_, f) in zip(torch_steps, fused_steps, strict=True):
        torch.testing.assert_close(f.entropies, e.entropies, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(f.threshold, e.threshold, atol=1e-5, rtol=1e-5)
        assert torch.equal(f.is_reasoning, e.is_reasoning)
        assert torch.equal(f.temperatures, e.temperatures)
        assert f.tokens.dtype == e.tokens.dtype and f.logprobs.dtype == e.logprobs.dtype
        min_p = settings.get("min_p", 0.0)
        for step in (e, f):
            ref = _log_softmax_at(logits, step.temperatures, step.tokens, min_p)
            torch.testing.assert_close(step.logprobs, ref, atol=1e-5, rtol=1e-5)
    if torch_window is not None:
        torch.testing.assert_close(fused_window.buffer, torch_window.buffer, atol=1e-5, rtol=1e-5)
        assert int(fused_window.count) == int(torch_window.count)


def test_sampler_fused_path_checks_logits():
    sampler = MultiTemperatureSampler(fused=True)
    logits = torch.randn(3, 40)
    logits[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"invalid logits \(NaN\) in rows \[2\]"):
        sampler(logits.to(DEV))
    # deferred (the CUDA default): the entropy kernel sets the flag that check_finite reads
    deferred = MultiTemperatureSampler(MultiTemperatureConfig(nan_check="deferred"), fused=True)
    deferred(torch.randn(3, 40, device=DEV))
    deferred.check_finite()
    deferred(logits.to(DEV))
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        deferred.check_finite()


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_sampler_in_cuda_graph_draws_fresh_tokens():
    cfg = MultiTemperatureConfig(threshold_mode="window", window_size=1000)
    sampler = MultiTemperatureSampler(cfg)
    assert sampler.uses_fused("cuda")  # the default on CUDA
    sampler.compile()  # as the rollout engine's compile_decode does
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(64, 151936, device="cuda", generator=g) * 2).to(torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sampler(logits)  # warm-up: compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sampler(logits)
    draws = []
    for _ in range(2):
        graph.replay()
        draws.append((out.tokens.clone(), out.logprobs.clone(), out.temperatures.clone()))
    torch.cuda.synchronize()
    (a, lp_a, t_a), (b, lp_b, t_b) = draws
    assert (a != b).float().mean() > 0.9, "a replay drew the same tokens: the seed is not fresh"
    for tokens, logprobs, temps in draws:
        ref = _log_softmax_at(logits, temps, tokens)
        torch.testing.assert_close(logprobs, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.entropies, token_entropy(logits), atol=1e-4, rtol=1e-5)
    assert int(sampler.window.count) == 3 * 64  # warm-up + two replays (capture runs nothing)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_draw_noise_path_matches_reference_on_gpu():
    x = (torch.randn(64, 151936, device="cuda") * 3).to(torch.bfloat16)
    temps = 0.5 + torch.rand(64, device="cuda")
    noise = torch.empty(64, 151936, device="cuda").exponential_()
    tokens, logprobs = fused_draw(x, temps, None, noise)
    ref_tokens, ref_logprobs = draw_reference(x, temps, noise)
    assert (tokens == ref_tokens).float().mean() > 0.98  # GPU division may round differently
    torch.testing.assert_close(logprobs, _log_softmax_at(x, temps, tokens), atol=1e-4, rtol=1e-5)
