import functools
import os

import numpy as np
import pytest
import torch

# TRITON_INTERPRET=1 on a machine without CUDA is set by tests/conftest.py, before any import
# of a kernel module.
from mtrl.sampling import (
    EntropyWindow,
    MultiTemperatureConfig,
    MultiTemperatureSampler,
    window_merge,
)
from mtrl.sampling.threshold import masked_quantile
from mtrl.sampling.window_merge import merge_window, merge_window_reference

Q = torch.tensor(0.8, dtype=torch.float64)
FALLBACK = torch.tensor(-1.0)
# The Triton path runs on CUDA when there is a device, else through the interpreter on the CPU.
DEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_triton = pytest.mark.skipif(
    not torch.cuda.is_available() and not INTERPRET,
    reason="Triton needs a GPU or TRITON_INTERPRET=1",
)
# The window's two merge paths: torch ops, and the Triton kernel (on the CPU, interpreted).
PATHS = [pytest.param(False, id="torch"), pytest.param(True, id="triton", marks=needs_triton)]


def np_quantile(values, q):
    return float(np.quantile(np.asarray(values, dtype=np.float64), q, method="linear"))


def _window(size, fused):
    """A window on the device its path runs on (Triton: CUDA, or the CPU interpreted)."""
    return EntropyWindow(size, DEV if fused else "cpu", fused=fused)


def _quantile(window, q=Q):
    dev = window.buffer.device
    return float(window.quantile(torch.as_tensor(q, dtype=torch.float64).to(dev), FALLBACK.to(dev)))


@pytest.mark.parametrize("fused", PATHS)
def test_window_reproduces_numpy_quantile_on_a_scripted_stream(fused):
    rng = np.random.default_rng(0)
    size = 37
    window = _window(size, fused)
    assert _quantile(window) == -1.0  # empty window -> fallback
    history = []
    for step in range(40):
        batch = int(rng.integers(1, 60))  # sometimes larger than the window
        values = rng.gamma(2.0, 1.0, size=batch).astype(np.float32)
        active = rng.random(batch) < 0.7
        window.add(torch.from_numpy(values).to(DEV), torch.from_numpy(active).to(DEV))
        history.extend(values[active].tolist())
        if not history:
            continue
        expected = np_quantile(history[-size:], 0.8)
        assert _quantile(window) == pytest.approx(expected, rel=1e-6), step
        assert int(window.count) == min(len(history), size)
        np.testing.assert_allclose(window.values().cpu().numpy(), history[-size:], rtol=0)


@pytest.mark.parametrize("fused", PATHS)
def test_window_without_mask_and_exact_fill(fused):
    window = _window(4, fused)
    dev = window.buffer.device
    window.add(torch.tensor([1.0, 2.0], device=dev))
    assert _quantile(window, 0.5) == 1.5
    window.add(torch.tensor([3.0, 4.0, 5.0], device=dev))  # wraps: window holds 2, 3, 4, 5
    assert window.values().tolist() == [2.0, 3.0, 4.0, 5.0]
    assert _quantile(window, 1.0) == 5.0
    assert _quantile(window, 0.0) == 2.0
    window.reset()
    assert int(window.count) == 0
    assert torch.isposinf(window.sorted).all()
    window.add(torch.tensor([7.0], device=dev))
    assert window.sorted.tolist() == [7.0, float("inf"), float("inf"), float("inf")]


# ----------------------------------------------------------------------------- sorted mirror
def _stream(rng, batch_max, kind):
    """One step's (values, active): values from a few integers with +inf among them
    ("dups"), or continuous ("gamma"); active all, none or a random part of the rows."""
    batch = int(rng.integers(1, batch_max + 1))
    if kind == "dups":
        values = rng.integers(0, 4, size=batch).astype(np.float32)
        values[rng.random(batch) < 0.15] = np.inf
    else:
        values = rng.gamma(2.0, 1.0, size=batch).astype(np.float32)
    active = rng.random(batch) < rng.choice([0.0, 0.3, 0.8, 1.0])
    return torch.from_numpy(values), torch.from_numpy(active)


def _check_mirror_over_a_stream(window, steps, batch_max, kind, seed=0):
    rng = np.random.default_rng(seed)
    size, n, wrapped = window.size, 0, False
    for step in range(steps):
        values, active = _stream(rng, batch_max, kind)
        dev = window.buffer.device
        window.add(
            values.to(dev), active.to(dev) if step % 5 else None
        )  # some steps without a mask
        n += int(active.sum()) if step % 5 else values.shape[0]
        wrapped |= n > size
        expected = torch.sort(window.buffer[:size]).values
        # bit for bit: the same values, +inf slots included, in the same order
        assert torch.equal(window.sorted.view(torch.int32), expected.view(torch.int32)), step
        assert int(window.count) == min(n, size)
    assert wrapped  # the stream filled the window and went around it


# (size, largest batch): tiny windows; windows smaller than a batch (only the last `size` of a
# step are kept); a window that fills over several steps and then wraps
MIRROR_CASES = [(1, 5), (2, 9), (7, 40), (100, 64), (1000, 256)]


@pytest.mark.parametrize("kind", ["dups", "gamma"])
@pytest.mark.parametrize(("size", "batch_max"), MIRROR_CASES)
def test_mirror_is_the_sorted_buffer_after_every_add_torch(size, batch_max, kind):
    window = EntropyWindow(size, fused=False)
    _check_mirror_over_a_stream(window, 40, batch_max, kind)


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
@pytest.mark.parametrize("kind", ["dups", "gamma"])
@pytest.mark.parametrize(("size", "batch_max"), MIRROR_CASES)
def test_mirror_is_the_sorted_buffer_after_every_add_triton(size, batch_max, kind, monkeypatch):
    # small tiles (on the CPU: interpreted), so that new values land in many different tiles
    monkeypatch.setattr(window_merge, "BLOCK", 16 if size < 1000 else 64)
    window = _window(size, True)
    _check_mirror_over_a_stream(window, 15 if size >= 1000 else 25, batch_max, kind)


def _merge_inputs(rng, n, b, n_kept, kind):
    """An old sorted window of n values and a step that replaces n_kept of them: values from
    a few integers and +inf ("dups"), ties of single old values at every tile edge ("edges"),
    or continuous values."""
    if kind == "dups":
        old = rng.integers(0, 3, size=n).astype(np.float32)
        old[rng.random(n) < 0.2] = np.inf
        new = rng.integers(0, 4, size=b).astype(np.float32)
        new[rng.random(b) < 0.2] = np.inf
    elif kind == "edges":  # distinct old values, each new one equal to one of them
        old = rng.permutation(n).astype(np.float32)
        new = rng.integers(0, n, size=b).astype(np.float32)
    else:
        old = rng.standard_normal(n).astype(np.float32)
        new = rng.standard_normal(b).astype(np.float32)
    gone = rng.choice(n, size=n_kept, replace=False)
    pad = np.full(b - n_kept, np.inf, dtype=np.float32)
    removed = np.sort(np.concatenate([old[gone], pad]))
    added = np.sort(np.concatenate([new[:n_kept], pad]))
    expected = np.sort(np.concatenate([np.delete(old, gone), new[:n_kept]]))
    args = [torch.from_numpy(x).to(DEV) for x in (np.sort(old), added, removed)]
    return args, torch.tensor(n_kept, device=DEV), torch.from_numpy(expected).to(DEV)


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
@pytest.mark.parametrize("kind", ["dups", "edges", "normal"])
@pytest.mark.parametrize(
    ("n", "b", "n_kept", "block"),
    # n off the tile grid; nothing kept; everything replaced; one value; B above BLOCK (two
    # rounds of new values in the tile that takes them all when the window is all +inf)
    [(300, 40, 25, 16), (300, 40, 0, 16), (40, 40, 40, 16), (1, 3, 1, 16), (500, 100, 90, 32)],
)
def test_merge_kernel_and_reference_against_a_sort(n, b, n_kept, block, kind):
    rng = np.random.default_rng(n + b + n_kept)
    (old, added, removed), k, expected = _merge_inputs(rng, n, b, n_kept, kind)
    for merge in (functools.partial(merge_window, block=block), merge_window_reference):
        out = torch.full((n,), -7.0, device=DEV)
        merge(old, added, removed, k, out)
        assert torch.equal(out, expected), merge


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
def test_merge_into_an_empty_window_puts_new_values_in_one_tile():
    """Warm-up: every old value is +inf, so all B new values land in the first tile, more
    than BLOCK_B of them when B > BLOCK."""
    n, b = 200, 50
    old = torch.full((n,), float("inf"), device=DEV)
    added = torch.sort(torch.rand(b, device=DEV) * 3).values
    removed = torch.full((b,), float("inf"), device=DEV)
    out = torch.empty(n, device=DEV)
    merge_window(old, added, removed, torch.tensor(b, device=DEV), out, block=16)
    assert torch.equal(out[:b], added) and torch.isposinf(out[b:]).all()


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
def test_window_stores_nan_as_inf_and_keeps_its_mirror(fused):
    window = _window(5, fused)
    dev = window.buffer.device
    window.add(torch.tensor([1.0, float("nan"), -0.0, 2.0], device=dev))
    assert window.values().tolist() == [1.0, float("inf"), 0.0, 2.0]
    assert torch.equal(window.sorted, torch.sort(window.buffer[:5]).values)
    assert not torch.signbit(window.sorted).any()  # -0.0 came in as +0.0
    window.add(torch.tensor([float("nan")] * 3, device=dev))  # wraps over the 1.0 and the +inf
    assert torch.equal(window.sorted, torch.sort(window.buffer[:5]).values)
    assert window.sorted.tolist() == [0.0, 2.0] + [float("inf")] * 3


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
def test_ring_step_above_max_rows_falls_back_to_torch_ops(monkeypatch):
    monkeypatch.setattr(window_merge, "MAX_RING_ROWS", 8)
    with pytest.raises(ValueError, match="rows"):
        window_merge.ring_add(torch.zeros(9), None, *[torch.zeros(()) for _ in range(3)])
    torch_window, triton_window = _window(30, False), _window(30, True)
    rng = np.random.default_rng(4)
    for _ in range(6):
        values, active = _stream(rng, 16, "dups")  # some steps above 8 rows, some below
        torch_window.add(values, active)
        triton_window.add(values.to(DEV), active.to(DEV))
        assert torch.equal(triton_window.sorted.cpu(), torch_window.sorted)
        assert torch.equal(triton_window.values().cpu(), torch_window.values())


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
def test_ops_and_window_under_torch_compile():
    """The sampler compiles its threshold step (``compile()``): the launches are custom ops
    that pass torch's op checks, and a compiled add + quantile matches the eager one."""
    from mtrl.sampling.window_merge import _merge_window_op, _ring_add_op

    rng = np.random.default_rng(3)
    (old, added, removed), k, _ = _merge_inputs(rng, 100, 8, 6, "dups")
    out = torch.empty(100, device=DEV)
    torch.library.opcheck(_merge_window_op, (old, added, removed, k, out, 16))
    ring = [torch.full((11,), float("inf"), device=DEV)]
    ring += [torch.tensor(3, device=DEV), torch.tensor(4, device=DEV)]
    ring += [torch.empty(8, device=DEV), torch.empty(8, device=DEV)]
    ring += [torch.empty((), dtype=torch.long, device=DEV)]
    values = torch.rand(5, device=DEV)
    torch.library.opcheck(_ring_add_op, (values, values > 0.5, *ring))

    def step(window, values, active):
        window.add(values, active)
        return window.quantile(Q.to(DEV), FALLBACK.to(DEV))

    compiled = torch.compile(step, dynamic=False)
    eager_window, compiled_window = _window(30, True), _window(30, True)
    for _ in range(4):
        values, active = (t.to(DEV) for t in _stream(rng, 16, "gamma"))
        expected = step(eager_window, values, active)
        assert torch.equal(compiled(compiled_window, values, active), expected)
        assert torch.equal(compiled_window.sorted, eager_window.sorted)
        assert torch.equal(compiled_window.buffer, eager_window.buffer)


def test_window_fused_needs_triton_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        EntropyWindow(4, fused=True)
    assert not EntropyWindow(4).fused  # auto: Triton on CUDA only


def test_masked_quantile_matches_numpy():
    rng = np.random.default_rng(1)
    values = rng.random(50).astype(np.float32)
    active = rng.random(50) < 0.5
    got = masked_quantile(torch.from_numpy(values), Q, torch.from_numpy(active), FALLBACK)
    assert float(got) == pytest.approx(np_quantile(values[active], 0.8), rel=1e-6)
    got = masked_quantile(torch.from_numpy(values), Q, None, FALLBACK)
    assert float(got) == pytest.approx(np_quantile(values, 0.8), rel=1e-6)
    none = torch.zeros(50, dtype=torch.bool)
    assert float(masked_quantile(torch.from_numpy(values), Q, none, FALLBACK)) == -1.0


def _random_logits(gen, batch, vocab=32):
    scale = torch.rand(batch, 1, generator=gen) * 4
    return torch.randn(batch, vocab, generator=gen) * scale


def test_sampler_window_mode_classifies_against_window_including_this_step():
    gen = torch.Generator().manual_seed(0)
    cfg = MultiTemperatureConfig(threshold_mode="window", window_size=50, reasoning_fraction=0.2)
    sampler = MultiTemperatureSampler(cfg, generator=gen)
    history = []
    for step in range(12):
        batch = 8
        active = torch.rand(batch, generator=gen) < 0.75
        out = sampler(_random_logits(gen, batch), active=active)
        history.extend(out.entropies[active].tolist())
        # the threshold is the 0.8 quantile of the last 50 entropies, this step's included
        expected = np_quantile(history[-50:], 0.8) if history else cfg.entropy_threshold
        assert float(out.threshold) == pytest.approx(expected, rel=1e-5), step
        assert torch.equal(out.is_reasoning, out.entropies >= out.threshold)
        expected_t = torch.where(out.is_reasoning, cfg.high_temperature, cfg.low_temperature)
        torch.testing.assert_close(out.temperatures, expected_t)
    assert int(sampler.window.count) == 50


def test_first_window_step_equals_batch_mode():
    logits = _random_logits(torch.Generator().manual_seed(5), 16)
    win = MultiTemperatureSampler(MultiTemperatureConfig(threshold_mode="window"))(logits)
    bat = MultiTemperatureSampler(MultiTemperatureConfig(threshold_mode="batch"))(logits)
    assert float(win.threshold) == pytest.approx(float(bat.threshold))
    # p = 0.2 of 16 rows: the rows at or above the 0.8 quantile
    assert int(bat.is_reasoning.sum()) == 4


def test_batch_mode_uses_active_rows_of_this_step():
    gen = torch.Generator().manual_seed(2)
    cfg = MultiTemperatureConfig(threshold_mode="batch", reasoning_fraction=0.4)
    sampler = MultiTemperatureSampler(cfg, generator=gen)
    for _ in range(3):
        active = torch.rand(20, generator=gen) < 0.6
        out = sampler(_random_logits(gen, 20), active=active)
        expected = np_quantile(out.entropies[active].tolist(), 0.6)
        assert float(out.threshold) == pytest.approx(expected, rel=1e-5)
        assert torch.equal(out.is_reasoning, out.entropies >= out.threshold)


def test_fixed_mode():
    cfg = MultiTemperatureConfig(threshold_mode="fixed", entropy_threshold=2.0)
    sampler = MultiTemperatureSampler(cfg)
    logits = torch.zeros(3, 100)
    logits[0, 0] = 20.0  # ~0 nats
    logits[1, :5] = 10.0  # ~log 5 = 1.61 nats
    # row 2 uniform: log 100 = 4.6 nats
    out = sampler(logits)
    assert out.is_reasoning.tolist() == [False, False, True]
    assert out.temperatures.tolist() == pytest.approx([0.8, 0.8, 1.2])
    assert float(out.threshold) == 2.0
    assert sampler.window is None
    # threshold exactly at an entropy counts as reasoning (>=)
    sampler = MultiTemperatureSampler(
        MultiTemperatureConfig(threshold_mode="fixed", entropy_threshold=float(out.entropies[1]))
    )
    assert sampler(logits).is_reasoning.tolist() == [False, True, True]


def test_reasoning_fraction_schedule_moves_the_quantile():
    from mtrl.sampling import ScheduleConfig

    cfg = MultiTemperatureConfig(
        threshold_mode="batch",
        reasoning_fraction_schedule=ScheduleConfig(kind="warmup", start=0.0, warmup_steps=10),
    )
    sampler = MultiTemperatureSampler(cfg)
    logits = _random_logits(torch.Generator().manual_seed(9), 101)
    ent = sampler(logits).entropies
    assert float(sampler(logits).threshold) == pytest.approx(float(ent.max()))  # p = 0
    sampler.step = 10  # p = 0.2
    assert float(sampler(logits).threshold) == pytest.approx(np_quantile(ent.tolist(), 0.8))


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("size", [1000, 100_000, 10_000_000])
def test_window_mirror_on_cuda_eager_and_in_a_cuda_graph(size):
    window = EntropyWindow(size, "cuda")
    assert window.fused  # the Triton kernels by default on CUDA
    g = torch.Generator(device="cuda").manual_seed(0)
    batch = 256
    q = torch.tensor(0.8, dtype=torch.float64, device="cuda")
    fallback = torch.tensor(-1.0, device="cuda")
    values = torch.empty(batch, device="cuda")
    active = torch.empty(batch, dtype=torch.bool, device="cuda")

    def fill(step):
        # a few integers (ties, +inf among them) on odd steps, continuous values on even ones
        x = torch.rand(batch, device="cuda", generator=g) * 3
        values.copy_(torch.where(x > 2.8, float("inf"), x.floor()) if step % 2 else x)
        active.copy_(torch.rand(batch, device="cuda", generator=g) < [0.0, 0.7, 1.0][step % 3])

    def check(step):
        torch.testing.assert_close(window.sorted, torch.sort(window.buffer[:size]).values)
        n = int(window.count)
        vals = window.values().double().cpu().numpy()
        if n and np.isfinite(vals).all():
            got = float(window.quantile(q, fallback))
            assert got == pytest.approx(np_quantile(vals, 0.8), rel=1e-6), step

    for step in range(6):  # eager
        fill(step)
        window.add(values, active)
        check(step)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fill(6)
        window.add(values, active)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    check(6)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        window.add(values, active)
        threshold = window.quantile(q, fallback)
    for step in range(7, 7 + (12 if size <= 100_000 else 3)):
        fill(step)
        graph.replay()
        torch.cuda.synchronize()
        check(step)
        assert torch.equal(threshold, window.quantile(q, fallback))
