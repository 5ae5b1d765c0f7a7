"""Fast rollouts: static KV cache + CUDA-graph decode step with the multi-temperature sampler.

    from mtrl.rollout import RolloutEngine, RolloutOutput, UnsupportedModelError, fuse_projections
    fuse_projections(model)   # optional, once, before the optimizer: one GEMM for q/k/v, gate/up
    engine = RolloutEngine(model, sampler, eos_token_ids, pad_token_id, max_new_tokens)
    out = engine.generate(input_ids, attention_mask, temperature_offsets=None)

See ``mtrl.rollout.engine`` for how it works. Imports only torch and transformers.
"""

from mtrl.rollout.engine import RolloutEngine, RolloutOutput, UnsupportedModelError
from mtrl.rollout.fused import fuse_projections

__all__ = ["RolloutEngine", "RolloutOutput", "UnsupportedModelError", "fuse_projections"]
