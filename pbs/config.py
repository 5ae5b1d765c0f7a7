"""Configuration of permuted block-sparse attention (PBS-Attn, arXiv:2510.21270)."""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("triton", "flex")


@dataclass(frozen=True)
class PBSConfig:
    """Every knob of PBS-Attn; defaults follow the paper.

    block_size: tokens per query block and per key block; the unit of selection.
    segment_size: keys are permuted only inside segments of this many tokens (a multiple of
        ``block_size``), so that causality between segments survives the permutation.
    threshold: per query block keep the smallest set of candidate key blocks whose pooled
        attention mass reaches this fraction; 1.0 keeps every causal block (dense attention).
    min_seq_len: sequences shorter than this take dense SDPA (measured crossover).
    force_sink: always keep the key block that holds token 0 (the attention sink).
    permute: sort keys inside segments by importance; False gives plain block-sparse.
    backend: "triton" (our kernel over block lists) or "flex" (FlexAttention, same lists).
    scale: softmax scale; None means 1/sqrt(head_dim), as in SDPA.
    """

    block_size: int = 128
    segment_size: int = 256
    threshold: float = 0.9
    # Dense SDPA (cuDNN) wins below the crossover measured in bench/results/pbs.md: on an
    # H200 at ~25% density dense won at 8K (0.62x) and PBS at 16K (1.56x).
    min_seq_len: int = 16384
    force_sink: bool = True
    permute: bool = True
    # triton measured faster end to end than flex at every length (flex pays ~13 ms at 128K
    # for building its BlockMask); the attention phases alone are within 3% of each other.
    backend: str = "triton"
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"pbs.block_size must be a power of two >= 16, got {self.block_size}")
        if self.segment_size < self.block_size or self.segment_size % self.block_size:
            raise ValueError(
                f"pbs.segment_size must be a multiple of block_size ({self.block_size}), "
                f"got {self.segment_size}"
            )
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"pbs.threshold must be in (0, 1], got {self.threshold}")
        if self.min_seq_len < 0:
            raise ValueError(f"pbs.min_seq_len must be >= 0, got {self.min_seq_len}")
        if self.backend not in BACKENDS:
            raise ValueError(f"pbs.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"pbs.scale must be positive, got {self.scale}")
