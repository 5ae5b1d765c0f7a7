import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from mtrl.sampling import MultiTemperatureConfig, MultiTemperatureSampler, token_entropy

NEG = float("-inf")
DRAWS = 20_000

# Two peaked (low entropy) and two flat (high entropy) rows; -inf entries are masked tokens.
ROWS = torch.tensor(
    [
        [6.0, 3.5, 2.0, 1.0, 0.5, 0.0, NEG, -1.0, NEG, -0.5, 0.2, 0.1],
        [0.0, 0.3, 5.0, 2.5, 1.5, NEG, 0.5, 0.0, -1.0, 1.0, NEG, 0.0],
        [0.3, 0.1, 0.0, -0.2, 0.4, 0.2, 0.1, NEG, 0.0, -0.3, 0.25, -0.1],
        [NEG, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, NEG],
    ]
)
PEAKED, FLAT = [0, 1], [2, 3]


def _config(**kw):
    base = dict(
        mode="multi",
        threshold_mode="fixed",
        entropy_threshold=1.5,
        high_temperature=1.6,
        low_temperature=0.6,
    )
    base.update(kw)
    return MultiTemperatureConfig(**base)


def _pooled_chisquare(counts, probs, n):
    expected = probs * n
    keep = expected >= 5
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def test_entropy_is_untempered_fp32_nats():
    ent = token_entropy(ROWS)
    p = torch.softmax(ROWS.double(), -1)
    ref = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1)
    assert ent.dtype == torch.float32
    torch.testing.assert_close(ent.double(), ref, atol=1e-5, rtol=1e-5)
    uniform = torch.zeros(2, 50, dtype=torch.bfloat16)
    torch.testing.assert_close(token_entropy(uniform), torch.full((2,), math.log(50)))
    assert ent[PEAKED].max() < 1.5 < ent[FLAT].min()


def test_draws_follow_softmax_at_class_temperature():
    gen = torch.Generator().manual_seed(1234)
    sampler = MultiTemperatureSampler(_config(), generator=gen)
    logits = ROWS.repeat_interleave(DRAWS, dim=0)  # (4 * DRAWS, vocab)
    step = sampler(logits)

    is_reasoning = torch.tensor([False, False, True, True]).repeat_interleave(DRAWS)
    assert torch.equal(step.is_reasoning, is_reasoning)
    torch.testing.assert_close(step.entropies, token_entropy(logits))
    expected_t = torch.where(is_reasoning, 1.6, 0.6)
    torch.testing.assert_close(step.temperatures, expected_t)
    assert float(step.threshold) == 1.5

    tokens = step.tokens.view(4, DRAWS)
    for r in range(4):
        t_row = 1.6 if r in FLAT else 0.6
        t_other = 0.6 if r in FLAT else 1.6
        counts = np.bincount(tokens[r].numpy(), minlength=ROWS.shape[1])
        masked = torch.isinf(ROWS[r]).numpy()
        assert counts[masked].sum() == 0, "a -inf token was drawn"
        probs = torch.softmax(ROWS[r].double() / t_row, -1).numpy()
        assert _pooled_chisquare(counts, probs, DRAWS) > 1e-3
        # power: the other class's temperature is rejected
        wrong = torch.softmax(ROWS[r].double() / t_other, -1).numpy()
        assert _pooled_chisquare(counts, wrong, DRAWS) < 1e-6

    # log-prob of the drawn token under softmax(logits / T)
    ref = torch.log_softmax(logits / expected_t[:, None], -1).gather(1, step.tokens[:, None])
    torch.testing.assert_close(step.logprobs, ref.squeeze(1), atol=1e-5, rtol=1e-5)


def test_single_mode_is_one_temperature():
    gen = torch.Generator().manual_seed(0)
    sampler = MultiTemperatureSampler(_config(mode="single", temperature=0.9), generator=gen)
    logits = ROWS.repeat_interleave(DRAWS, dim=0)
    step = sampler(logits)
    assert torch.all(step.temperatures == 0.9)
    # entropies and classes are still reported (for metrics)
    assert step.is_reasoning.view(4, DRAWS)[:, 0].tolist() == [False, False, True, True]
    counts = np.bincount(step.tokens.view(4, DRAWS)[3].numpy(), minlength=ROWS.shape[1])
    probs = torch.softmax(ROWS[3].double() / 0.9, -1).numpy()
    assert _pooled_chisquare(counts, probs, DRAWS) > 1e-3


def test_masked_tokens_never_drawn_even_when_hot():
    gen = torch.Generator().manual_seed(7)
    logits = torch.full((4096, 64), NEG)
    logits[:, 5] = 0.0
    logits[:, 40] = -30.0
    sampler = MultiTemperatureSampler(_config(high_temperature=50.0, low_temperature=50.0), gen)
    step = sampler(logits)
    assert set(step.tokens.unique().tolist()) <= {5, 40}


def test_nan_logits_raise():
    sampler = MultiTemperatureSampler(_config())
    logits = ROWS.clone()
    logits[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"invalid logits \(NaN\) in rows \[2\]"):
        sampler(logits)
    logits = ROWS.clone()
    logits[1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"\+inf"):
        sampler(logits)
    with pytest.raises(ValueError, match="no finite logit"):
        sampler(torch.full((2, 5), NEG))


def test_nan_deferred_check():
    # the CUDA path: no sync per step, a device flag read once by check_finite()
    sampler = MultiTemperatureSampler(_config(nan_check="deferred"))
    sampler(ROWS)
    sampler.check_finite()  # nothing wrong yet
    bad = ROWS.clone()
    bad[0, 0] = float("nan")
    sampler(bad)  # does not raise here
    sampler(ROWS)
    with pytest.raises(ValueError, match="NaN"):
        sampler.check_finite()
    sampler.check_finite()  # the flag was cleared


def _truncation_reference(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """Plain per-row reference: temperature first, then top-k, top-p, min-p."""
    x = (logits / temperature).tolist()
    keep = [v > NEG for v in x]
    order = sorted(range(len(x)), key=lambda i: -x[i])
    if top_k:
        for i in order[top_k:]:
            keep[i] = False
    if top_p < 1:
        z = [math.exp(x[i]) if keep[i] else 0.0 for i in range(len(x))]
        s = sum(z)
        before = 0.0
        for i in order:
            if keep[i] and before >= top_p:
                keep[i] = False
            before += z[i] / s
    if min_p > 0:
        z = [math.exp(x[i]) if keep[i] else 0.0 for i in range(len(x))]
        s = sum(z)
        for i in range(len(x)):
            if keep[i] and z[i] / s < min_p * max(z) / s:
                keep[i] = False
    y = torch.tensor([v if k else NEG for v, k in zip(x, keep, strict=True)], dtype=torch.float64)
    return torch.softmax(y, -1)


@pytest.mark.parametrize(
    "knob, value, support_hot, support_cold",
    [
        # logits [3, 2, 1, 0, -1]; hot row at T=2, cold row at T=0.5
        ("top_p", 0.6, 2, 1),  # at T=1 both rows would keep 1 token
        ("min_p", 0.2, 4, 1),  # at T=1 both rows would keep 2 tokens
        ("top_k", 3, 3, 3),
    ],
)
def test_truncation_applies_after_temperature(knob, value, support_hot, support_cold):
    # Both rows are the same low-entropy distribution (class "knowledge", T=0.5); a rollout
    # offset of +1.5 on the first half makes those rows draw at T=2.
    base = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, NEG])
    logits = base.repeat(2 * DRAWS, 1)
    gen = torch.Generator().manual_seed(3)
    cfg = _config(
        mode="multi",
        high_temperature=2.0,
        low_temperature=0.5,
        offsets_apply_to="all",
        **{knob: value},
    )
    sampler = MultiTemperatureSampler(cfg, generator=gen)
    offsets = torch.zeros(2 * DRAWS)
    offsets[:DRAWS] = 1.5
    step = sampler(logits, temperature_offsets=offsets)
    assert torch.all(step.temperatures[:DRAWS] == 2.0)
    assert torch.all(step.temperatures[DRAWS:] == 0.5)
    cases = ((slice(0, DRAWS), 2.0, support_hot), (slice(DRAWS, None), 0.5, support_cold))
    for rows, t, support in cases:
        ref = _truncation_reference(logits[0], t, **{knob: value})
        assert int((ref > 0).sum()) == support
        counts = np.bincount(step.tokens[rows].numpy(), minlength=logits.shape[1])
        assert np.all(counts[(ref == 0).numpy()] == 0)
        if support > 1:
            assert _pooled_chisquare(counts, ref.numpy(), DRAWS) > 1e-3
        lp = torch.log(ref)[step.tokens[rows]].float()
        torch.testing.assert_close(step.logprobs[rows], lp, atol=1e-5, rtol=1e-5)


def test_rollout_offsets_and_clamp():
    sampler = MultiTemperatureSampler(
        _config(rollout_offsets=True, min_temperature=0.05, offsets_apply_to="all")
    )
    offsets = sampler.offsets_tensor(num_generations=4, batch_size=8)
    assert offsets.tolist() == pytest.approx([0, 0, -0.1, 0.1] * 2)
    step = sampler(ROWS.repeat(2, 1), temperature_offsets=offsets)
    base = torch.tensor([0.6, 0.6, 1.6, 1.6] * 2)
    torch.testing.assert_close(step.temperatures, base + offsets)
    step = sampler(ROWS, temperature_offsets=torch.full((4,), -5.0))
    assert torch.all(step.temperatures == 0.05)
    # first_index shifts the group position of the first row
    assert sampler.offsets_tensor(4, 2, first_index=2).tolist() == pytest.approx([-0.1, 0.1])


def test_step_drives_schedules():
    from mtrl.sampling import ScheduleConfig

    cfg = _config(
        high_temperature=1.0,
        high_temperature_schedule=ScheduleConfig(kind="linear", end=1.7, steps=400),
    )
    sampler = MultiTemperatureSampler(cfg)
    assert float(sampler(ROWS).temperatures[2]) == pytest.approx(1.0)
    sampler.step = 200
    assert sampler.scheduled_values()["high_temperature"] == pytest.approx(1.35)
    assert float(sampler(ROWS).temperatures[2]) == pytest.approx(1.35)
    sampler.step = 400
    assert float(sampler(ROWS).temperatures[3]) == pytest.approx(1.7)
    assert float(sampler(ROWS).temperatures[0]) == pytest.approx(0.6)


def test_bf16_logits_accepted():
    sampler = MultiTemperatureSampler(_config(), generator=torch.Generator().manual_seed(0))
    step = sampler(ROWS.to(torch.bfloat16))
    assert step.entropies.dtype == torch.float32
    assert step.tokens.shape == (4,)
    with pytest.raises(ValueError, match="batch, vocab"):
        sampler(ROWS[0])


def test_compiled_sampler_matches_eager():
    """`compile()` (the rollout engine's compile_decode) changes speed, not results: with the same
    noise stream, tokens, log-probs, temperatures, thresholds and the window agree."""

    def run(compiled: bool):
        cfg = MultiTemperatureConfig(
            threshold_mode="window", window_size=50, top_k=200, top_p=0.95, min_p=0.01
        )
        sampler = MultiTemperatureSampler(cfg, generator=torch.Generator().manual_seed(1))
        if compiled:
            sampler.compile()
        data = torch.Generator().manual_seed(3)
        active = torch.tensor([True, True, False, True, True, True])
        steps = []
        for _ in range(4):
            logits = torch.randn(6, 300, generator=data) * 3
            logits[1, :250] = float("-inf")
            steps.append(sampler(logits, active, torch.linspace(0, 0.3, 6)))
        return steps, sampler.window.buffer

    eager, eager_window = run(False)
    fused, fused_window = run(True)
    for e, f in zip(eager, fused, strict=True):
        assert torch.equal(e.tokens, f.tokens)
        assert torch.equal(e.is_reasoning, f.is_reasoning)
        for name in ("logprobs", "temperatures", "entropies", "threshold"):
            torch.testing.assert_close(getattr(f, name), getattr(e, name))
    torch.testing.assert_close(fused_window, eager_window)
