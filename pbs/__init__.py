"""Permuted block-sparse attention (PBS-Attn, arXiv:2510.21270) for causal prefill.

from pbs import PBSConfig, pbs_attention, reference_attention
"""

from .api import pbs_attention
from .config import PBSConfig
from .reference import reference_attention

__all__ = ["PBSConfig", "pbs_attention", "reference_attention"]
