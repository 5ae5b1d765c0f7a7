"""The `rollout:` section of an experiment: which generation path, and the sampling correction.

A plain structured config for OmegaConf (imports nothing heavy). `validate()` holds every rule
of the section and raises a `ValueError` whose one-line message starts with the key path, e.g.
`rollout.importance_sampling_cap: must be a finite number >= 1, got nan`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class EngineChoice(enum.StrEnum):
    """Which generation path rollouts take (values compare equal to their strings)."""

    auto = "auto"  # fast on CUDA (under ZeRO-3 as rollout.zero3_weights says), hf elsewhere
    fast = "fast"  # our static-cache, CUDA-graph engine (mtrl.rollout.RolloutEngine)
    hf = "hf"  # transformers generate


class Zero3Weights(enum.StrEnum):
    """What rollouts read under DeepSpeed ZeRO-3, where a gather puts the weights in new storage."""

    auto = "auto"  # the engine on its own copy if that copy fits in free GPU memory, else generate
    copy = "copy"  # the engine on its own copy, refreshed from one gather per rollout
    generate = "generate"  # transformers generate on the gathered weights


@dataclass
class RolloutConfig:
    """How rollouts are generated, and the correction for sampling/training mismatch."""

    engine: EngineChoice = EngineChoice.auto
    # Under ZeRO-3 the engine runs on a copy of the gathered weights at fixed addresses, so its
    # CUDA graphs survive re-gathering (mtrl.rollout.mirror); costs one more copy of the weights
    # on each GPU. engine=fast always copies; engine=hf ignores this key.
    zero3_weights: Zero3Weights = Zero3Weights.auto
    check_every: int = 16  # fast engine: decode steps between host checks for finished rows
    # fast engine: torch.compile the decode forward inside its CUDA graph (fuses small kernels;
    # about 20 s of compilation once per batch size)
    compile_decode: bool = True
    # fast engine: Llama/Qwen2-style decoder layers decode with fused Triton kernels for residual
    # add + RMSNorm and SiLU-mul (mtrl.rollout.fused_norm); other models are unaffected. Off:
    # with compile_decode (whose inductor fusions overlap) 1.0-1.3% faster on an H100
    # (bench/results/rollout.md), and bf16 rows may part from the plain decode at near-ties.
    fused_norms: bool = False
    # fast engine, with compile_decode: inductor benchmarks Triton GEMM tiles against cuBLAS for
    # every projection of the decode step (minutes more compilation once per batch size).
    max_autotune: bool = False
    # fast engine, CUDA: the prefill forward through torch.compile with dynamic shapes (one
    # compilation, 30-55 s on an H200, for every batch and prompt width; fuses its norm, rope and
    # activation kernels): 2.6% faster rollouts at batch 64 and 256 new tokens on an H200,
    # 0.4-0.6% at 2,048 (bench/results/rollout.md).
    compile_prefill: bool = True
    # Correct for the gap between the forward that sampled (cached decoding, other kernels)
    # and the one that trains: weight each token's loss by min(p_train / p_sample, cap).
    importance_sampling: bool = True
    importance_sampling_cap: float = 2.0

    def validate(self, prefix: str = "rollout") -> RolloutConfig:
        """Check every field; raise ValueError('<prefix>.<key>: <why>, got <value>')."""
        if self.engine not in set(EngineChoice):
            allowed = ", ".join(EngineChoice)
            raise ValueError(f"{prefix}.engine: must be one of {allowed}, got {self.engine!r}")
        if self.zero3_weights not in set(Zero3Weights):
            allowed = ", ".join(Zero3Weights)
            raise ValueError(
                f"{prefix}.zero3_weights: must be one of {allowed}, got {self.zero3_weights!r}"
            )
        if self.engine == EngineChoice.fast and self.zero3_weights == Zero3Weights.generate:
            raise ValueError(
                f"{prefix}.zero3_weights: generate contradicts {prefix}.engine=fast (under "
                "ZeRO-3 the engine runs on the weight copy); use auto or copy, or engine=hf"
            )
        for key in ("compile_decode", "fused_norms", "max_autotune", "compile_prefill"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(
                    f"{prefix}.{key}: must be true or false, got {getattr(self, key)!r}"
                )
        if self.max_autotune and not self.compile_decode:
            raise ValueError(
                f"{prefix}.max_autotune: tunes the compiled decode step, so it needs "
                f"{prefix}.compile_decode=true, got compile_decode=false"
            )
        if not self.check_every >= 1:
            raise ValueError(f"{prefix}.check_every: must be >= 1, got {self.check_every!r}")
        # A cap below 1 would shrink even on-policy tokens (ratio 1); NaN would reach the loss.
        cap = self.importance_sampling_cap
        if not (math.isfinite(cap) and cap >= 1):
            raise ValueError(
                f"{prefix}.importance_sampling_cap: must be a finite number >= 1, got {cap!r}"
            )
        return self

    def engine_options(self, device: torch.device) -> dict:
        """The fast engine's keyword arguments from this section (trainer and evaluator alike)
        for a policy on ``device``: the compiled paths only on CUDA."""
        cuda = device.type == "cuda"
        return dict(
            check_every=self.check_every,
            compile_decode=self.compile_decode and cuda,
            fused_norms=self.fused_norms,
            max_autotune=self.max_autotune,
            compile_prefill=self.compile_prefill and cuda,
        )
