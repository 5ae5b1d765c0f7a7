"""The engine's own copy of a model whose parameters move: rollouts under DeepSpeed ZeRO-3.

Under ZeRO-3 each GPU holds a shard of every parameter. A rollout gathers them once (TRL's
``unwrap_model_for_generation(..., gather_deepspeed3_params=True)``), and every gather puts them
in new storage, while the engine's CUDA graphs read the weights at the addresses they were
captured with. A ``WeightMirror`` is a model of the same structure whose parameters and buffers
are tensors it owns, at addresses that never change; each rollout copies the gathered values
into them:

    with unwrap_model_for_generation(model_wrapped, accelerator) as model:   # the gather
        mirror = mirror_for(model, "auto")      # built on first use; None: generate instead
        mirror.refresh(model)                   # copy the values (one multi-tensor copy)
    # the full parameters are partitioned again; generate from the copy
    out = generate(mirror.model, ..., engine=engine_for(mirror.model, ...))

Structure: every module of the mirror is a shallow copy of the live one (same class, same
attribute values and config objects) with its own parameter and buffer tensors and no hooks
(DeepSpeed's parameter-fetch hooks, the trainer's hidden-state scaling: a rollout needs none of
them); a ``forward`` set on a live instance (TRL's fused log-prob head wraps the live model's
bound forward) is dropped, so the mirror runs its class's forward. Parameters tied in the live model (an LM head sharing the embedding) are one tensor in
the mirror too. The q/k/v and gate/up weights of each layer then share one buffer per group
(``fuse_projections``), so the engine runs each group as one GEMM.

LoRA (a ``PeftModel``): its adapter layers are modules like any other, so the mirror holds the
base weights and the adapters and runs them unmerged, like the engine without ZeRO. Merging
into the copy would round the update into the base weight's dtype: in bf16 any element of B @ A
below half a bf16 step of its base weight (2^-9 of it) vanishes, which early LoRA updates do.

Memory: one more copy of every parameter in its gathered dtype (a 1.5B model in bf16: 3 GB),
resident from the first rollout on. While ``refresh`` copies, the gathered weights exist too;
generation then holds the copy instead of the gathered weights, so its own peak is unchanged.
``mirror_for`` builds the copy only where it fits in the free device memory (``"auto"``) and
says so in one log line either way.
"""

from __future__ import annotations

import copy
import logging
import types
import weakref

import torch
from torch import nn

from mtrl.rollout.fused import fuse_projections

logger = logging.getLogger(__name__)

# Device memory left free beyond the copy itself (allocator rounding, the engine's own buffers).
RESERVE_BYTES = 1 << 30

# live model -> its mirror; live model -> why it has none; the mirrors' models
_MIRRORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_DECLINED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MIRROR_MODELS: weakref.WeakSet = weakref.WeakSet()


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Each distinct parameter and buffer of ``model``, named by its first path, in module order.

    Raises ValueError for a parameter that ZeRO-3 has partitioned (it holds none of its values).
    """
    seen: set[int] = set()
    out = []
    for path, module in model.named_modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in vars(module)[kind].items():
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                full = f"{path}.{name}" if path else name
                if t.numel() == 0 and getattr(t, "ds_numel", 0):
                    raise ValueError(
                        f"weight mirror: {full} is partitioned by ZeRO-3 (0 of {t.ds_numel} "
                        "values here); build and refresh the mirror inside the gather"
                    )
                out.append((full, t))
    return out


def _signature(tensors: list[tuple[str, torch.Tensor]]) -> tuple:
    return tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in tensors)


def mirror_bytes(model: nn.Module) -> int:
    """Bytes of one copy of ``model``'s distinct parameters and buffers (full sizes under ZeRO-3)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += getattr(t, "ds_numel", t.numel()) * t.element_size()
    return total


def available_bytes(device: torch.device) -> int | None:
    """Device memory a new allocation can take now: free plus cached by PyTorch; None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


class WeightMirror:
    """A structural copy of ``model`` with engine-owned parameter and buffer tensors.

    ``WeightMirror(model)`` builds it from a model whose parameters are all present (under
    ZeRO-3: inside the gather) and copies their values; ``refresh(model)`` copies them again,
    into the same tensors. ``model`` of the mirror (``mirror.model``) is in eval mode, needs no
    gradients and is what the engine serves; ``nbytes`` is the size of the copy.
    """

    def __init__(self, model: nn.Module):
        tensors = _tensors(model)
        self.signature = _signature(tensors)
        made: dict[int, torch.Tensor] = {}
        for _, t in tensors:  # tied parameters: one copy, reached from every place
            if isinstance(t, nn.Parameter):
                made[id(t)] = nn.Parameter(torch.empty_like(t.detach()), requires_grad=False)
            else:
                made[id(t)] = t.detach().clone()
        clones: dict[int, nn.Module] = {}
        self.model = _clone(model, clones, made)
        for module in clones.values():  # a plain attribute naming a module names its copy
            state = vars(module)
            for name, value in list(state.items()):
                if isinstance(value, nn.Module) and id(value) in clones:
                    state[name] = clones[id(value)]
        self.model.eval()
        # One buffer per q/k/v and gate/up group: from here on no tensor moves again.
        fuse_projections(self.model)
        mine = _tensors(self.model)
        if _signature(mine) != self.signature:  # a structure the shallow copy did not reproduce
            raise ValueError("weight mirror: the copy's parameters differ from the model's")
        self._targets = [t.detach() for _, t in mine]
        self.nbytes = sum(t.numel() * t.element_size() for t in self._targets)
        _MIRROR_MODELS.add(self.model)
        self.refresh(model)

    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` still has the parameters (names, shapes, dtypes) it was built from."""
        return _signature(_tensors(model)) == self.signature

    @torch.no_grad()
    def refresh(self, model: nn.Module) -> None:
        """Copy every parameter and buffer value of ``model`` into the mirror's own tensors."""
        tensors = _tensors(model)
        signature = _signature(tensors)
        if signature != self.signature:
            pairs = zip(signature, self.signature, strict=False)
            diff = [now[0] for now, was in pairs if now != was]
            what = diff[0] if diff else f"{len(signature)} tensors, was {len(self.signature)}"
            raise ValueError(
                f"weight mirror: the model's tensors changed since the mirror was built "
                f"({what}); mirror_for(model) builds a new one"
            )
        torch._foreach_copy_(self._targets, [t.detach() for _, t in tensors])

    def data_ptrs(self) -> list[int]:
        """Addresses of the mirror's tensors (they never change)."""
        return [t.data_ptr() for t in self._targets]


def _clone(module: nn.Module, clones: dict[int, nn.Module], made: dict) -> nn.Module:
    """A shallow copy of ``module`` and its submodules: tensors from ``made``, no hooks."""
    if id(module) in clones:  # a module reached twice stays one module
        return clones[id(module)]
    new = copy.copy(module)
    clones[id(module)] = new
    state = vars(new)
    # A forward set on the instance wraps the live model's own (TRL's fused log-prob head
    # holds the live bound forward): the mirror runs its class's forward.
    state.pop("forward", None)
    for name, value in list(state.items()):
        if "hook" in name and isinstance(value, dict):
            state[name] = type(value)()
        elif isinstance(value, types.MethodType) and value.__self__ is module:
            state[name] = types.MethodType(value.__func__, new)
    state["_parameters"] = {n: made.get(id(p)) for n, p in vars(module)["_parameters"].items()}
    state["_buffers"] = {n: made.get(id(b)) for n, b in vars(module)["_buffers"].items()}
    state["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    state["_modules"] = {
        n: None if child is None else _clone(child, clones, made)
        for n, child in vars(module)["_modules"].items()
    }
    return new


def mirror_for(
    model: nn.Module, weights: str = "auto", available: int | None = None
) -> WeightMirror | None:
    """The weight mirror of ``model`` (gathered), built on first use; None where it has none.

    ``weights`` is ``rollout.zero3_weights``: ``"copy"`` always builds; ``"auto"`` builds when
    the copy plus ``RESERVE_BYTES`` fits in ``available`` bytes (default: what the model's
    device has free; off CUDA, always), else declines with one log line, for good. A model
    whose parameters changed (names, shapes, dtypes) gets a new mirror.
    """
    if model in _DECLINED:
        return None
    mirror = _MIRRORS.get(model)
    if mirror is not None:
        if mirror.matches(model):
            return mirror
        logger.info("ZeRO-3 rollouts: the model's parameters changed; copying them anew")
        _MIRRORS.pop(model)
    need = mirror_bytes(model)
    if weights == "auto":
        device = next(model.parameters()).device
        have = available_bytes(device) if available is None else available
        if have is not None and need + RESERVE_BYTES > have:
            decline_mirror(
                model,
                f"the engine's weight copy needs {need / 2**30:.2f} GiB + "
                f"{RESERVE_BYTES / 2**30:.0f} GiB spare, {have / 2**30:.2f} GiB is free on "
                f"{device} (rollout.zero3_weights=auto)",
            )
            return None
    mirror = WeightMirror(model)
    _MIRRORS[model] = mirror
    logger.info(
        "ZeRO-3 rollouts: the fast engine runs on its own copy of the weights (%.2f GiB), "
        "refreshed from one gather per rollout",
        mirror.nbytes / 2**30,
    )
    return mirror


def decline_mirror(model: nn.Module, reason: str) -> None:
    """``model`` gets no mirror from now on (its copy is freed); one log line says why."""
    _MIRRORS.pop(model, None)
    _DECLINED[model] = reason
    logger.warning("ZeRO-3 rollouts: transformers generate on the gathered weights: %s", reason)


def is_mirror(model: nn.Module) -> bool:
    """Whether ``model`` is a weight mirror's model (its tensors never move)."""
    return model in _MIRROR_MODELS
