import pytest
import torch

from mtrl.sampling import CUDAGraphSampler, MultiTemperatureConfig, MultiTemperatureSampler


def test_graph_sampler_falls_back_to_eager_on_cpu():
    sampler = CUDAGraphSampler(MultiTemperatureSampler(MultiTemperatureConfig(window_size=10)))
    sampler.step = 3
    assert sampler.sampler.step == 3
    out = sampler(torch.randn(4, 20))
    assert out.tokens.shape == (4,)
    assert int(sampler.window.count) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_sampler_matches_eager_statistics():
    cfg = MultiTemperatureConfig(threshold_mode="window", window_size=300)
    eager = MultiTemperatureSampler(cfg)
    graphed = CUDAGraphSampler(MultiTemperatureSampler(cfg))
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(6):
        x = torch.randn(64, 1000, device="cuda", generator=gen) * 3
        active = torch.rand(64, device="cuda", generator=gen) < 0.8
        a, b = eager(x, active), graphed(x, active)
        torch.testing.assert_close(a.entropies, b.entropies)
        torch.testing.assert_close(a.threshold, b.threshold)
        assert torch.equal(a.is_reasoning, b.is_reasoning)
        torch.testing.assert_close(a.temperatures, b.temperatures)
    assert int(graphed.window.count) == int(eager.window.count)
    graphed.step = 5  # schedules reach the captured graph through in-place fills
    bad = x.clone()
    bad[0, 0] = float("nan")
    graphed(bad, active)
    with pytest.raises(ValueError, match="NaN"):
        graphed.check_finite()
