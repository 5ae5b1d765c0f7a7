"""Rollouts: the one ``generate`` that training and evaluation sample through.

    from mtrl.rollout import engine_for, fuse_projections, generate, wants_engine
    fuse_projections(model)   # optional, once, before the optimizer: one GEMM for q/k/v, gate/up
    engine = engine_for(model, sampler, "train", max_new_tokens=256, eos_token_ids=[eos],
                        pad_token_id=pad) if wants_engine("auto", device, zero3=False) else None
    out = generate(model, input_ids, attention_mask, sampler=sampler, max_new_tokens=256,
                   eos_token_ids=[eos], pad_token_id=pad, engine=engine)

``generate`` runs the fast engine (``mtrl.rollout.engine``: static KV cache, CUDA-graph decode
step, split-KV decode attention, fused projections) where it can serve, transformers
``generate`` otherwise; see ``mtrl.rollout.generate``. Under DeepSpeed ZeRO-3 the engine runs
on a weight mirror (``mirror_for(model).refresh(model)`` inside the gather, then
``generate(mirror.model, ...)``); see ``mtrl.rollout.mirror``. Imports torch, transformers and
accelerate.
"""

from mtrl.rollout.config import EngineChoice, RolloutConfig, Zero3Weights
from mtrl.rollout.engine import RolloutEngine, RolloutOutput, UnsupportedModelError
from mtrl.rollout.fused import fuse_projections
from mtrl.rollout.generate import completion_mask, engine_for, generate, wants_engine
from mtrl.rollout.mirror import WeightMirror, decline_mirror, is_mirror, mirror_for

__all__ = [
    "EngineChoice",
    "RolloutConfig",
    "RolloutEngine",
    "RolloutOutput",
    "UnsupportedModelError",
    "WeightMirror",
    "Zero3Weights",
    "completion_mask",
    "decline_mirror",
    "engine_for",
    "fuse_projections",
    "generate",
    "is_mirror",
    "mirror_for",
    "wants_engine",
]
