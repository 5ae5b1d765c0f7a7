"""Where our Triton kernels can run: CUDA devices, or any device while Triton interprets.

Triton decides by its own knob, ``triton.knobs.runtime.interpret`` (``TRITON_INTERPRET`` set to
a true value: 1, true, yes, on, any case), whether ``triton.jit`` kernels run interpreted on
the CPU (the tests). The rollout engine, the sampler and the entropy window all ask here, so
that they agree with Triton and with each other on every value of that variable.
"""

from __future__ import annotations

import torch
import triton


def triton_runs_on(device: torch.device | str) -> bool:
    """Whether Triton kernels can run on tensors of ``device``."""
    return torch.device(device).type == "cuda" or triton.knobs.runtime.interpret
