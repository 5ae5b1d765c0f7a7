"""Multi-temperature sampling (arXiv:2510.08892): entropy-classified tokens, scheduled temperatures.

    from mtrl.sampling import MultiTemperatureConfig, MultiTemperatureSampler
    sampler = MultiTemperatureSampler(MultiTemperatureConfig(...))
    sampler.step = optimizer_step
    step = sampler(logits)  # tokens, temperatures, entropies, is_reasoning, logprobs, threshold

``MultiTemperatureLogitsProcessor`` (imported lazily: it needs transformers) runs the same
sampler inside Hugging Face ``generate``.
"""

from mtrl.sampling.config import MultiTemperatureConfig, ScheduleConfig
from mtrl.sampling.entropy import token_entropy
from mtrl.sampling.sampler import (
    CUDAGraphSampler,
    MultiTemperatureSampler,
    SamplerStep,
    truncate,
)
from mtrl.sampling.schedules import rollout_offsets, schedule_value
from mtrl.sampling.threshold import EntropyWindow

__all__ = [
    "CUDAGraphSampler",
    "EntropyWindow",
    "MultiTemperatureConfig",
    "MultiTemperatureLogitsProcessor",
    "MultiTemperatureSampler",
    "SampledTokens",
    "SamplerStep",
    "ScheduleConfig",
    "rollout_offsets",
    "schedule_value",
    "token_entropy",
    "truncate",
]


def __getattr__(name: str):
    if name in ("MultiTemperatureLogitsProcessor", "SampledTokens"):
        from mtrl.sampling import processor

        return getattr(processor, name)
    raise AttributeError(f"module 'mtrl.sampling' has no attribute {name!r}")
