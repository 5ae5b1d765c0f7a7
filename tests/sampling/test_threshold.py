import numpy as np
import pytest
import torch

from mtrl.sampling import EntropyWindow, MultiTemperatureConfig, MultiTemperatureSampler
from mtrl.sampling.threshold import masked_quantile

Q = torch.tensor(0.8, dtype=torch.float64)
FALLBACK = torch.tensor(-1.0)


def np_quantile(values, q):
    return float(np.quantile(np.asarray(values, dtype=np.float64), q, method="linear"))


def test_window_reproduces_numpy_quantile_on_a_scripted_stream():
    rng = np.random.default_rng(0)
    size = 37
    window = EntropyWindow(size)
    assert float(window.quantile(Q, FALLBACK)) == -1.0  # empty window -> fallback
    history = []
    for step in range(40):
        batch = int(rng.integers(1, 60))  # sometimes larger than the window
        values = rng.gamma(2.0, 1.0, size=batch).astype(np.float32)
        active = rng.random(batch) < 0.7
        window.add(torch.from_numpy(values), torch.from_numpy(active))
        history.extend(values[active].tolist())
        if not history:
            continue
        expected = np_quantile(history[-size:], 0.8)
        got = float(window.quantile(Q, FALLBACK))
        assert got == pytest.approx(expected, rel=1e-6), step
        assert int(window.count) == min(len(history), size)
        np.testing.assert_allclose(window.values().numpy(), history[-size:], rtol=0)


def test_window_without_mask_and_exact_fill():
    window = EntropyWindow(4)
    window.add(torch.tensor([1.0, 2.0]))
    assert float(window.quantile(torch.tensor(0.5, dtype=torch.float64), FALLBACK)) == 1.5
    window.add(torch.tensor([3.0, 4.0, 5.0]))  # wraps: window holds 2, 3, 4, 5
    assert window.values().tolist() == [2.0, 3.0, 4.0, 5.0]
    assert float(window.quantile(torch.tensor(1.0, dtype=torch.float64), FALLBACK)) == 5.0
    assert float(window.quantile(torch.tensor(0.0, dtype=torch.float64), FALLBACK)) == 2.0
    window.reset()
    assert int(window.count) == 0


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
