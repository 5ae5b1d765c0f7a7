"""Without a GPU, run our Triton kernels through Triton's interpreter. This must happen before
the first import of pbs (triton.jit decides at decoration time), hence here."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
