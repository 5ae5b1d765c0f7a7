"""Fast rollouts: static KV cache + CUDA-graph decode step with the multi-temperature sampler.

    from mtrl.rollout import RolloutEngine, RolloutOutput, UnsupportedModelError
    engine = RolloutEngine(model, sampler, eos_token_ids, pad_token_id, max_new_tokens)
    out = engine.generate(input_ids, attention_mask, temperature_offsets=None)

See ``mtrl.rollout.engine`` for how it works. Imports only torch and transformers.
"""

from mtrl.rollout.engine import RolloutEngine, RolloutOutput, UnsupportedModelError

__all__ = ["RolloutEngine", "RolloutOutput", "UnsupportedModelError"]
