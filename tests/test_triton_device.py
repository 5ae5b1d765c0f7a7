"""The engine, the sampler and the entropy window agree with Triton on where kernels run."""

import pytest
import triton

from mtrl.config import TinyModelConfig
from mtrl.models import build_tiny_model, build_tiny_tokenizer
from mtrl.rollout.fused_norm import FusedNorms
from mtrl.sampling import MultiTemperatureSampler
from mtrl.sampling.threshold import EntropyWindow
from mtrl.triton_device import triton_runs_on


@pytest.mark.parametrize("value", ["1", "true", "on", "0", "2", ""])
def test_every_user_reads_triton_interpret_as_triton_does(monkeypatch, value):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    interpreted = triton.knobs.runtime.interpret
    model = build_tiny_model(TinyModelConfig(), build_tiny_tokenizer())
    assert interpreted == (value in ("1", "true", "on"))
    assert triton_runs_on("cpu") == interpreted
    assert triton_runs_on("cuda")
    if interpreted:
        assert MultiTemperatureSampler(fused=True).uses_fused("cpu")
        assert EntropyWindow(8, fused=True).fused
        assert FusedNorms(model).reason is None
        return
    with pytest.raises(ValueError, match="sampler: fused=True needs"):
        MultiTemperatureSampler(fused=True).uses_fused("cpu")
    with pytest.raises(ValueError, match="EntropyWindow: fused=True needs"):
        EntropyWindow(8, fused=True)
    assert FusedNorms(model).reason == "Triton does not run on cpu"
