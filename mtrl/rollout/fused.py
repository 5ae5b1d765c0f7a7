"""One GEMM for the projections that read the same input (q/k/v, gate/up), weights not copied.

At batch 64 a decoding step's small projections are latency-bound GEMMs of ~5 us each; one
GEMM over the concatenated weights of a group costs about as much as its largest member.
Concatenating the weights per step would read them twice, so instead:

1. ``fuse_projections(model)`` moves each group's weights (and biases) into one buffer, once,
   so that the parameters become adjacent row blocks of it. Call it after the model is on its
   device and before an optimizer or a distributed wrapper holds the parameters; training is
   unchanged (each parameter is still its own leaf tensor; optimizer updates land in place).
2. ``ProjectionGroups(model)`` finds the groups whose weights are adjacent in memory *now* and,
   while installed, routes each group's first linear to one GEMM over a view spanning them all,
   handing the other members their column slices of that output. A group whose weights were
   never fused or have moved since (``.to()``, ZeRO flattening) keeps its separate GEMMs.

The routing relies on the model calling a group's first member first, then the others on the
same input tensor (``q_proj, k_proj, v_proj`` and ``gate_proj, up_proj`` in Llama-family
attention and MLP blocks); a member called on another input computes its own GEMM, so the
result is always right.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

# Sibling linears that read the same input, in the order the model calls them.
GROUP_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _linear_groups(model: nn.Module) -> list[list[nn.Linear]]:
    """Each module's sibling plain ``nn.Linear`` layers (same input size, dtype, device, bias)."""
    groups = []
    for module in model.modules():
        for names in GROUP_NAMES:
            linears = [getattr(module, n, None) for n in names]
            # Exactly nn.Linear: a LoRA or quantized layer computes more than x @ W^T + b.
            if not all(type(lin) is nn.Linear for lin in linears):
                continue
            w0 = linears[0].weight
            if any(
                lin.in_features != linears[0].in_features
                or lin.weight.dtype != w0.dtype
                or lin.weight.device != w0.device
                or (lin.bias is None) != (linears[0].bias is None)
                for lin in linears
            ):
                continue
            groups.append(linears)
    return groups


def _adjacent(tensors: list[torch.Tensor]) -> bool:
    """Contiguous tensors laid out back to back in one storage, in this order."""
    first = tensors[0]
    end = first.storage_offset()
    for t in tensors:
        if not t.is_contiguous() or t.storage_offset() != end:
            return False
        if t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return False
        end += t.numel()
    return True


def _span(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A view over adjacent tensors concatenated along dim 0 (no copy)."""
    rows = sum(t.shape[0] for t in tensors)
    first = tensors[0].detach()
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


@torch.no_grad()
def fuse_projections(model: nn.Module) -> int:
    """Make each q/k/v and gate/up group's parameters adjacent views of one buffer.

    One copy of those weights, once; returns the number of groups now adjacent. Parameters stay
    the same ``nn.Parameter`` objects (``.data`` is repointed), so call it before an optimizer,
    DDP or DeepSpeed takes them, and after moving the model to its device.
    """
    fused = 0
    for linears in _linear_groups(model):
        for name in ("weight", "bias"):
            params = [getattr(lin, name) for lin in linears]
            if params[0] is None or _adjacent([p.data for p in params]):
                continue
            buffer = torch.cat([p.data for p in params])
            start = 0
            for p in params:
                p.data = buffer[start : start + p.shape[0]]
                start += p.shape[0]
        fused += 1
    return fused


class _Group:
    """One group's spanning weight/bias views and the output its lead linear last computed."""

    def __init__(self, linears: list[nn.Linear]):
        self.linears = linears
        self.weight = _span([lin.weight for lin in linears])
        self.bias = None if linears[0].bias is None else _span([lin.bias for lin in linears])
        self.sizes = [lin.out_features for lin in linears]
        self.input: torch.Tensor | None = None
        self.outputs: tuple[torch.Tensor, ...] | None = None
        # Built once, so that reinstalling keeps the same objects (torch.compile guards on them).
        self.forwards = [functools.partial(_lead_forward, self)] + [
            functools.partial(_member_forward, self, i) for i in range(1, len(linears))
        ]


def _lead_forward(group: _Group, x: torch.Tensor) -> torch.Tensor:
    outputs = F.linear(x, group.weight, group.bias).split(group.sizes, dim=-1)
    group.input, group.outputs = x, outputs
    return outputs[0]


def _member_forward(group: _Group, i: int, x: torch.Tensor) -> torch.Tensor:
    if group.input is not x:
        lin = group.linears[i]
        return F.linear(x, lin.weight, lin.bias)
    out = group.outputs[i]
    if i == len(group.sizes) - 1:  # the last member: drop the references
        group.input = group.outputs = None
    return out


class ProjectionGroups:
    """The model's projection groups whose weights are adjacent now, routed to one GEMM each.

    ``groups = ProjectionGroups(model)``; ``with groups: ...`` runs the model with the fused
    GEMMs (instance ``forward`` overrides on the member linears, removed on exit). Rebuild it
    when parameter storage may have moved; ``len(groups)`` is the number of fused groups.
    ``ProjectionGroups()`` (no model) has none.
    """

    def __init__(self, model: nn.Module | None = None):
        self.groups = []
        for linears in _linear_groups(model) if model is not None else []:
            tensors = [[lin.weight for lin in linears]]
            if linears[0].bias is not None:
                tensors.append([lin.bias for lin in linears])
            if all(_adjacent(ts) for ts in tensors):
                self.groups.append(_Group(linears))

    def __len__(self) -> int:
        return len(self.groups)

    def __enter__(self) -> ProjectionGroups:
        for group in self.groups:
            for lin, forward in zip(group.linears, group.forwards, strict=True):
                lin.forward = forward
        return self

    def __exit__(self, *exc) -> None:
        for group in self.groups:
            group.input = group.outputs = None
            for lin in group.linears:
                lin.__dict__.pop("forward", None)
