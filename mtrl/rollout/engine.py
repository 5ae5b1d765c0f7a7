"""Fast rollouts: batched generation with a static KV cache and a CUDA-graph decode step.

    engine = RolloutEngine(model, sampler, eos_token_ids=[eos], pad_token_id=pad,
                           max_new_tokens=1024)
    out = engine.generate(input_ids, attention_mask, temperature_offsets=None)
    out.completion_ids, out.mask, out.temperatures, out.entropies, out.is_reasoning, out.logprobs

How one ``generate`` runs (B rows, left-padded prompts of width P, T = ``max_new_tokens``):

1. **Prefill** through the model's configured attention implementation (sdpa, flash, or
   ``pbs`` so PBS-Attn serves long prompts) with a ``DynamicCache``, so the attention sees
   query length == key length (no cached prefix); positions come from the attention mask
   (``cumsum - 1``, as ``generate`` does). Only the last position's logits are computed
   (``logits_to_keep=1``). The keys/values are then copied into a transformers
   ``StaticCache`` of length ``round_up(P + T - 1, kv_bucket)`` whose layers are written at
   the engine's device position (``_DecodeLayer``: no per-layer position counter).
2. **Token 0** is drawn from the prefill logits by the same ``_consume`` function the decode
   step ends with (sampler call + finished-row bookkeeping).
3. **Decode**: ``_decode_step`` = model forward of one token per row (positions and cache
   position kept as device counters), the multi-temperature sampler, and the bookkeeping
   (finished rows emit ``pad_token_id``, their mask is False, outputs are written at a device
   column counter). Everything is on the device, with no host synchronisation. On CUDA the
   step is captured once per (batch, cache length) in a ``torch.cuda.CUDAGraph`` (and per
   key-length bucket when decode attention is SDPA; warm-up on a side stream, graphs share
   one memory pool) and replayed; elsewhere (CPU, or ``use_cuda_graph=False``, or a failed
   capture) the very same ``_decode_step`` runs eagerly. The host reads ``finished.all()``
   only every ``check_every`` steps to stop early.

Decode attention: during decode steps the model's attention modules dispatch (through
transformers' ``AttentionInterface``) to ``_decode_attention``: grouped-query heads are folded
into the query length, so K/V are read once per KV head (no ``repeat_kv`` copy), and the
padding + causal mask is one additive (B, 1, 1, L) tensor built once per step. On CUDA the
attention is our split-KV Triton kernel (``mtrl.rollout.decode_attention``): SDPA backends run
one program per (row, KV head) over all its keys, too few programs to stream K/V at full
bandwidth. Ours reads the step's cache position on the device, skips the keys after it and
spreads the ones before it over its splits, so one captured graph serves every step (L = the
whole cache); it also stores the step's key and value into the cache (the cache layers' update
hands them over instead of writing them); being an operator, it lets ``torch.compile`` trace
the whole decode forward as one graph. Without it (SDPA: other head dims, devices, or
``split_kv_attention=False``) keys are sliced to the step's bucket of ``kv_bucket`` positions,
a separate graph per bucket, so early steps don't read the whole cache. The prefill keeps the
configured implementation.

Projections: where a layer's q/k/v (and gate/up) weights are adjacent in memory
(``fuse_projections(model)`` makes them so, once; the trainer does it), prefill and decode run
one GEMM per group over a view of them (``mtrl.rollout.fused``): at batch 64 the separate small
GEMMs are latency-bound. Groups are re-detected whenever parameter storage moves.

Fused norms (``fused_norms=True``): while the engine decodes, Llama/Qwen2-style decoder layers
run residual add + RMSNorm and SiLU-mul as single Triton kernels (``mtrl.rollout.fused_norm``;
instance forwards installed around the decode steps and removed after, so prefill and every
forward outside the engine run the model's own code). Other models keep their plain layers;
one log line says which. Off by default: 1.0-1.3% faster on an H100 with ``compile_decode``
(bench/results/rollout.md), and in bf16 its rows may part from the plain decode at near-ties.

Sampler RNG: the sampler's ``exponential_`` noise uses the default CUDA generator (or the
sampler's own generator, registered with the graph), which CUDA graphs support through philox
seed/offset bookkeeping: each replay draws fresh noise.

Models: the policy is used in place (no weight copy; nothing to sync). LoRA: a ``PeftModel``
runs **unmerged**; the adapter layers are part of the captured step, and since optimizer
updates are in place the graphs keep seeing the current weights. If any parameter's storage
moves (``.to()``, merging, gathered ZeRO-3 weights), the graphs are re-captured on the next
call. Under ZeRO-3 the trainer therefore serves a weight mirror (``mtrl.rollout.mirror``): a
copy of the model at fixed addresses into which each rollout's gathered values are copied.
Gradient checkpointing and dropout are off during rollout (``model.eval()`` under
``torch.no_grad()``; the previous train/eval mode is restored). Models whose caches
``StaticCache`` cannot represent as plain full-attention layers (sliding-window, linear or
hybrid caches, encoder-decoders), or whose attention does not go through transformers'
``AttentionInterface``, raise ``UnsupportedModelError``: catch it and fall back to
``generate``.

Memory: the static cache, the output buffers and the graphs of the most recent shape are kept
for the next call (rollouts in training repeat the same shape); ``release()`` frees them.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from transformers import AttentionInterface, DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

from mtrl.rollout.config import RolloutConfig
from mtrl.rollout.decode_attention import decode_attention, supports_head_dim
from mtrl.rollout.fused import ProjectionGroups
from mtrl.rollout.fused_norm import FusedNorms
from mtrl.triton_device import triton_runs_on

logger = logging.getLogger(__name__)

DECODE_ATTENTION = "mtrl_rollout_decode"


class UnsupportedModelError(RuntimeError):
    """The model can't be served by the engine (cache type, attention dispatch); use generate."""


@dataclass
class RolloutOutput:
    """Completions and, aligned with them, what the sampler did; each (B, T).

    Column j is the j-th generated token and the temperature/entropy/class/log-prob of the
    distribution it was drawn from (the logits at position ``P + j - 1``). Positions where
    ``mask`` is False (after the EOS) hold ``pad_token_id``, temperature 1.0, entropy 0.0,
    reasoning False, log-prob 0.0. T is the longest completion (<= ``max_new_tokens``).
    """

    completion_ids: torch.Tensor  # long
    mask: torch.Tensor  # bool, real tokens, the EOS included
    temperatures: torch.Tensor  # fp32
    entropies: torch.Tensor  # fp32, nats at T = 1
    is_reasoning: torch.Tensor  # bool
    logprobs: torch.Tensor  # fp32, under the tempered, truncated distribution drawn from
    steps: int = 0  # token steps run (prefill sample + decode steps)
    used_cuda_graph: bool = False
    backend: str = "engine"  # "engine" or "generate" (transformers), see mtrl.rollout.generate

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(1)


# ----------------------------------------------------------------------------- attention
class _DecodeContext:
    """What the decode attention reads; set by the engine before each eager step / capture."""

    def __init__(self):
        self.mask: torch.Tensor | None = None  # (B, 1, 1, L) additive, compute dtype
        self.kv_len: int = 0
        self.calls: int = 0
        self.split_kv: bool = False  # our Triton split-KV kernel over the whole cache, not SDPA
        self.last_key: torch.Tensor | None = None  # 0-dim, the cache position written this step
        self.layers: list = []  # the static cache's layers, by layer index


_CTX = _DecodeContext()
_REGISTERED = False


def _decode_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """One-token attention over the static cache; GQA folded into the query length."""
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise UnsupportedModelError("rollout engine: soft-capped / sink attention is not supported")
    if not torch.compiler.is_compiling():
        # Counted on eager steps only (the first step, which proves the dispatch): a traced
        # read would guard on the count and recompile the decode forward at every step.
        _CTX.calls += 1
    b, h, q_len, d = query.shape
    kvh = key.shape[1]
    layer_idx = getattr(module, "layer_idx", None)
    if _CTX.split_kv and layer_idx is None:
        raise UnsupportedModelError("rollout engine: attention modules need a layer_idx")
    mask = _CTX.mask
    if mask.dtype != query.dtype:
        mask = mask.to(query.dtype)
    # Query head g * rep + r uses KV head g (repeat_kv's layout): (B, KVH, rep * q_len, D).
    q = query.reshape(b, kvh, (h // kvh) * q_len, d)
    if _CTX.split_kv:
        # key, value: this step's (B, KVH, 1, D) (see _DecodeLayer.update); the kernel writes
        # them into the layer's cache and attends over it in one launch. An operator
        # torch.compile traces through: the compiled step is one graph.
        layer = _CTX.layers[layer_idx]
        out = decode_attention(
            q,
            layer.keys,
            layer.values,
            mask,
            scale=scaling,
            last_key=_CTX.last_key,
            new_k=key,
            new_v=value,
        )
    else:
        out = _sdpa_over_bucket(q, key, value, mask, scaling)
    return out.reshape(b, h, q_len, -1).transpose(1, 2), None


@torch.compiler.disable
def _sdpa_over_bucket(q, key, value, mask, scaling: float | None) -> torch.Tensor:
    # Kept out of torch.compile (a graph break per layer): the key bucket differs between the
    # captured graphs, and one compilation serves them all.
    n = _CTX.kv_len
    return F.scaled_dot_product_attention(
        q, key[:, :, :n], value[:, :, :n], attn_mask=mask, scale=scaling
    )


def _register_attention() -> None:
    global _REGISTERED
    if not _REGISTERED:
        AttentionInterface.register(DECODE_ATTENTION, _decode_attention)
        _REGISTERED = True


class _DecodeLayer(StaticLayer):
    """A static cache layer written at the engine's device position ``_CTX.last_key``.

    StaticLayer.update keeps a position counter of its own and advances it with a kernel per
    layer and step; the engine already holds the position on the device. With the split-KV
    kernel the write moves into the attention launch (update hands the step's key and value
    (B, KVH, 1, D) to ``_decode_attention``, the kernel stores them); with SDPA it is an
    index_copy_ here. Only decode steps call update: the prefill fills the layers by copy.
    """

    def update(self, key_states, value_states, *args, **kwargs):
        if _CTX.split_kv:
            return key_states, value_states
        position = _CTX.last_key.view(1)
        self.keys.index_copy_(2, position, key_states)
        self.values.index_copy_(2, position, value_states)
        return self.keys, self.values


# ----------------------------------------------------------------------------- state
class _Slot:
    """Static buffers of one (batch, cache length) shape; graphs are keyed by key bucket."""

    def __init__(self, batch: int, cache_len: int, new_tokens: int, device, cache, eos, pad):
        self.batch, self.cache_len = batch, cache_len
        self.cache = cache
        long = dict(dtype=torch.long, device=device)
        self.key_valid = torch.ones(batch, cache_len, dtype=torch.bool, device=device)
        self.arange = torch.arange(cache_len, **long)
        self.cur = torch.zeros(batch, **long)
        self.pos = torch.zeros(batch, **long)
        self.cache_pos = torch.zeros((), **long)
        self.col = torch.zeros((), **long)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.offsets = torch.zeros(batch, dtype=torch.float32, device=device)
        self.eos = torch.tensor(eos if eos else [-1], **long)
        self.pad = torch.full((), pad, **long)
        f32 = dict(dtype=torch.float32, device=device)
        self.out_tokens = torch.full((batch, new_tokens), pad, **long)
        self.out_mask = torch.zeros(batch, new_tokens, dtype=torch.bool, device=device)
        self.out_temperatures = torch.ones(batch, new_tokens, **f32)
        self.out_entropies = torch.zeros(batch, new_tokens, **f32)
        self.out_is_reasoning = torch.zeros(batch, new_tokens, dtype=torch.bool, device=device)
        self.out_logprobs = torch.zeros(batch, new_tokens, **f32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.fingerprint: tuple | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}


def _tensor_attrs(obj) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vars(obj).items() if isinstance(v, torch.Tensor)}


def _step_mask(key_valid, arange, cache_pos, kv_len: int, dtype) -> torch.Tensor:
    """(B, 1, 1, kv_len) additive mask of a decode step: 0 where the key is a real token at or
    before ``cache_pos`` (0-dim), else -inf."""
    allowed = key_valid[:, :kv_len] & (arange[:kv_len] <= cache_pos)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, float("-inf"))[:, None, None, :]


def _record_step(s: _Slot, tokens, temperatures, entropies, logprobs, is_reasoning) -> None:
    """Write one sampled token per row (each (B,)) and what the sampler did at column ``s.col``;
    finished rows get ``pad`` and neutral values, and a drawn EOS finishes its row."""
    active = ~s.finished
    tok = torch.where(active, tokens, s.pad)
    col = s.col.view(1)
    s.out_tokens.index_copy_(1, col, tok[:, None])
    s.out_mask.index_copy_(1, col, active[:, None])
    # Under autocast the sampler's per-token values may come in the logits' dtype (bf16): the
    # record keeps its own (float32).
    for out, value, idle in (
        (s.out_temperatures, temperatures, 1.0),
        (s.out_entropies, entropies, 0.0),
        (s.out_logprobs, logprobs, 0.0),
    ):
        out.index_copy_(1, col, torch.where(active, value.to(out.dtype), idle)[:, None])
    s.out_is_reasoning.index_copy_(1, col, (active & is_reasoning)[:, None])
    s.finished |= (tok[:, None] == s.eos[None, :]).any(1)
    s.cur.copy_(tok)
    s.col.add_(1)


# ----------------------------------------------------------------------------- engine
class RolloutEngine:
    """Batched generation for the policy in place: static KV cache + CUDA-graph decode step.

    ``RolloutEngine(model, sampler, eos_token_ids, pad_token_id, max_new_tokens,
    use_cuda_graph=None, check_every=16, kv_bucket=256)``

    - ``model``: a transformers causal LM (or a ``PeftModel`` around one; LoRA runs unmerged
      inside the graph).
    - ``sampler``: ``mtrl.sampling.MultiTemperatureSampler``; set ``sampler.step`` before
      ``generate`` as usual (its schedule tensors are read by the graph on each replay).
    - ``use_cuda_graph``: None = on CUDA devices; False = eager (the same step function).
    - ``check_every``: decode steps between host checks of "all rows finished".
    - ``kv_bucket``: cache length granularity and key-length bucket of the decode graphs.
    - ``fused_projections``: route q/k/v and gate/up to one GEMM per group where the weights
      are adjacent in memory (see ``mtrl.rollout.fused``; ``fuse_projections(model)`` makes
      them so, once). Groups that aren't adjacent run as before.
    - ``split_kv_attention``: decode attention through our split-KV Triton kernel
      (``mtrl.rollout.decode_attention``, head dims that are powers of two in 16..256) over
      the whole cache, one CUDA graph for all steps. None (default): on CUDA; True: also on
      the CPU when Triton interprets kernels (``TRITON_INTERPRET=1``, the tests); False, or
      other head dims: SDPA over key buckets, a graph per bucket.
    - ``compile_decode``: run the decode forward and the sampler's tensor work
      (``sampler.compile()``) through ``torch.compile`` (default mode, no inductor CUDA
      graphs; the split-KV kernel is traced as an operator, SDPA stays eager) inside the
      captured graph, which fuses the many small elementwise kernels; costs one compilation
      per batch size.
    - ``max_autotune``: with ``compile_decode``, inductor benchmarks Triton GEMM tiles against
      cuBLAS for every projection shape of the decode step and keeps the faster (its
      ``max_autotune`` option, no inductor CUDA graphs); minutes more compilation per batch.
    - ``compile_prefill``: run the prefill forward through ``torch.compile`` too, with dynamic
      shapes (one compilation for every batch size and prompt length), which fuses its eager
      norm, rope and activation kernels; about as long to compile as the decode step.
    - ``fused_norms``: during decode steps, Llama/Qwen2-style decoder layers run residual
      add + RMSNorm and SiLU-mul as fused Triton kernels (``mtrl.rollout.fused_norm``; CUDA,
      or any device under ``TRITON_INTERPRET=1``); other models decode with their own layers.

    Raises ``UnsupportedModelError`` (at construction or on the first ``generate``) for models
    the static cache or the decode attention can't serve.
    """

    def __init__(
        self,
        model,
        sampler,
        eos_token_ids: int | Iterable[int] | None,
        pad_token_id: int,
        max_new_tokens: int,
        use_cuda_graph: bool | None = None,
        check_every: int = 16,
        kv_bucket: int = 256,
        compile_decode: bool = False,
        fused_projections: bool = True,
        split_kv_attention: bool | None = None,
        fused_norms: bool = False,
        max_autotune: bool = False,
        compile_prefill: bool = False,
    ):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
        RolloutConfig(check_every=check_every).validate(prefix="RolloutEngine")  # its one rule
        if kv_bucket < 16 or kv_bucket % 16:
            raise ValueError(f"kv_bucket: must be a positive multiple of 16, got {kv_bucket}")
        self.model = model
        self.sampler = sampler
        if eos_token_ids is None:
            eos = []
        elif isinstance(eos_token_ids, int):
            eos = [eos_token_ids]
        else:
            eos = [int(e) for e in eos_token_ids]
        self.eos_token_ids = eos
        if pad_token_id is None:
            raise ValueError("pad_token_id: required (finished rows emit it)")
        self.pad_token_id = int(pad_token_id)
        self.max_new_tokens = int(max_new_tokens)
        self.use_cuda_graph = use_cuda_graph
        self.check_every = int(check_every)
        self.kv_bucket = int(kv_bucket)
        self.compile_decode = bool(compile_decode)
        self.fused_projections = bool(fused_projections)
        self.split_kv_attention = split_kv_attention
        self._split_kv = False  # decided per device at each generate (_uses_split_kv)
        self._groups = ProjectionGroups()  # found at the first generate
        self._groups_fingerprint: tuple | None = None
        self.fused_norms = bool(fused_norms)
        self.max_autotune = bool(max_autotune)
        self.compile_prefill = bool(compile_prefill)
        self._compiled_prefill = None
        self._norms = FusedNorms()  # planned at the first generate (the device matters)
        self._norms_fingerprint: tuple | None = None
        # The step's mask and the bookkeeping after each draw are a dozen small kernels eagerly,
        # a few compiled.
        self._record, self._step_mask = _record_step, _step_mask
        if self.compile_decode:
            sampler.compile()
            self._record = torch.compile(_record_step, dynamic=False)
            self._step_mask = torch.compile(_step_mask, dynamic=False)
        self._compiled = None
        self._slot: _Slot | None = None
        self._pool = None
        self._graph_failed: str | None = None
        self._base = model.get_base_model() if is_peft_model(model) else model
        self._check_supported()
        config = self._base.config
        self._head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        params = inspect.signature(self._base.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params
        self._configs = self._attention_configs()
        _register_attention()

    # ------------------------------------------------------------------ model checks
    def _check_supported(self) -> None:
        config = getattr(self._base, "config", None)
        if config is None:
            raise UnsupportedModelError("rollout engine: the model has no transformers config")
        if getattr(config, "is_encoder_decoder", False):
            raise UnsupportedModelError("rollout engine: encoder-decoder models are not supported")
        try:
            cache = StaticCache(config=config, max_cache_len=self.kv_bucket)
        except Exception as e:  # noqa: BLE001 - any failure means: not servable
            raise UnsupportedModelError(
                f"rollout engine: StaticCache does not support {type(self._base).__name__}: {e}"
            ) from e
        kinds = {type(layer).__name__ for layer in cache.layers}
        if any(type(layer) is not StaticLayer for layer in cache.layers):
            raise UnsupportedModelError(
                "rollout engine: needs full-attention static cache layers only, "
                f"{type(self._base).__name__} uses {sorted(kinds)}"
            )

    def _attention_configs(self) -> list:
        seen, out = set(), []
        for m in self._base.modules():
            c = getattr(m, "config", None)
            if c is not None and hasattr(c, "_attn_implementation_internal") and id(c) not in seen:
                seen.add(id(c))
                out.append(c)
        return out

    # ------------------------------------------------------------------ helpers
    def _forward(self, cache, decode: bool = False, **kwargs):
        kwargs[self._cache_kw] = cache
        kwargs["use_cache"] = True
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        fn = self._base
        # The engine's first decode step stays uncompiled: it counts the attention calls.
        if decode and self.compile_decode and self._check_done:
            if self._compiled is None:
                # One compile per batch: the split-KV step is one graph over the whole cache;
                # SDPA over key buckets is kept out of the graph (a break per layer).
                # combo_kernels: independent small kernels (a layer's q and k rope, ...) launch
                # as one; 379 -> 351 kernels a step and -3% time at batch 64 on an H200
                # (bench/results/rollout.md), where a step is bound by launches, not bytes.
                options = {"combo_kernels": True, "max_autotune": self.max_autotune}
                self._compiled = torch.compile(self._base, dynamic=False, options=options)
            fn = self._compiled
        if not decode and self.compile_prefill:
            if self._compiled_prefill is None:
                self._compiled_prefill = torch.compile(
                    self._base, dynamic=True, options={"combo_kernels": True}
                )
            fn = self._compiled_prefill
        out = fn(**kwargs)
        return out.logits[:, -1]

    def _recompile_limit(self):
        """torch._dynamo's recompile limit raised for this call. Each compiled function of the
        engine (decode forward, sampler, bookkeeping, prefill) keeps an entry per batch size
        and cache length, shared with every other engine over the same model in the process,
        and with graph breaks one per layer; at dynamo's default of 8 entries a function runs
        uncompiled from then on, so a ninth batch size would decode eagerly."""
        limit = 8 * len(self._configs) + 4 * self._base.config.num_hidden_layers + 64
        names = ("recompile_limit", "cache_size_limit")  # the older torch's name too
        return torch._dynamo.config.patch(
            **{k: limit for k in names if hasattr(torch._dynamo.config, k)}
        )

    def _set_decode_attention(self, on: bool) -> None:
        if on:
            self._saved_impl = [c._attn_implementation_internal for c in self._configs]
            for c in self._configs:
                c._attn_implementation_internal = DECODE_ATTENTION
        else:
            for c, impl in zip(self._configs, self._saved_impl, strict=True):
                c._attn_implementation_internal = impl

    def _fingerprint(self) -> tuple:
        return tuple(p.data_ptr() for p in self._base.parameters()) + tuple(
            b.data_ptr() for b in self._base.buffers()
        )

    def release(self) -> None:
        """Free the static cache, buffers and graphs kept for the next call."""
        self._slot = None
        self._pool = None

    def _bucket(self, cache_pos: int, cache_len: int) -> int:
        """Key length a step writing cache position ``cache_pos`` attends over: the whole
        cache for the split-KV kernel (it skips the keys after the position), else the
        ``kv_bucket`` multiple that holds the position."""
        if self._split_kv:
            return cache_len
        return min(cache_len, (cache_pos // self.kv_bucket + 1) * self.kv_bucket)

    def _uses_split_kv(self, device: torch.device) -> bool:
        if self.split_kv_attention is False or not supports_head_dim(self._head_dim):
            return False
        if self.split_kv_attention is None:
            return device.type == "cuda"
        if not triton_runs_on(device):
            raise ValueError(
                f"split_kv_attention=True needs CUDA or TRITON_INTERPRET=1, got {device}"
            )
        return True

    def _graphs_wanted(self, device: torch.device) -> bool:
        if device.type != "cuda":
            return False
        if self.use_cuda_graph is False or self._graph_failed is not None:
            return False
        return True

    # ------------------------------------------------------------------ slot
    def _get_slot(self, batch: int, prompt_len: int, device) -> _Slot:
        need = prompt_len + self.max_new_tokens - 1
        cache_len = max(self.kv_bucket, math.ceil(need / self.kv_bucket) * self.kv_bucket)
        s = self._slot
        if s is not None and s.batch == batch and s.cache_len == cache_len:
            if s.key_valid.device == device:
                return s
        self._slot = None  # free the old one first
        cache = StaticCache(config=self._base.config, max_cache_len=cache_len)
        # _check_supported made sure that every layer is a plain StaticLayer.
        cache.layers = [_DecodeLayer(max_cache_len=cache_len) for _ in cache.layers]
        self._slot = _Slot(
            batch,
            cache_len,
            self.max_new_tokens,
            device,
            cache,
            self.eos_token_ids,
            self.pad_token_id,
        )
        return self._slot

    def _reset(self, s: _Slot, attention_mask, offsets, prompt_len: int) -> None:
        s.key_valid.fill_(True)
        s.key_valid[:, :prompt_len].copy_(attention_mask.bool())
        s.pos.copy_(attention_mask.long().sum(1))
        s.cache_pos.fill_(prompt_len)
        s.col.zero_()
        s.finished.zero_()
        if offsets is None:
            s.offsets.zero_()
        else:
            s.offsets.copy_(offsets.reshape(-1).to(s.offsets))
        s.out_tokens.fill_(self.pad_token_id)
        s.out_mask.zero_()
        s.out_temperatures.fill_(1.0)
        s.out_entropies.zero_()
        s.out_is_reasoning.zero_()
        s.out_logprobs.zero_()

    # ------------------------------------------------------------------ the step
    def _prefill(self, s: _Slot, input_ids, attention_mask) -> torch.Tensor:
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(attention_mask == 0, 1)
        dyn = DynamicCache(config=self._base.config)
        logits = self._forward(
            dyn, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        )
        p = input_ids.shape[1]
        if len(dyn.layers) != len(s.cache.layers):
            raise UnsupportedModelError(
                f"rollout engine: prefill filled {len(dyn.layers)} cache layers, "
                f"the static cache has {len(s.cache.layers)}"
            )
        for src, dst in zip(dyn.layers, s.cache.layers, strict=True):
            if not dst.is_initialized:
                dst.lazy_initialization(src.keys, src.values)
            dst.keys[:, :, :p].copy_(src.keys)
            dst.values[:, :, :p].copy_(src.values)
        return logits

    def _consume(self, s: _Slot, logits: torch.Tensor) -> None:
        """Sample one token per row and record it at column ``s.col`` (no host sync)."""
        step = self.sampler(logits, active=~s.finished, temperature_offsets=s.offsets)
        self._record(s, step.tokens, step.temperatures, step.entropies, step.logprobs,
                     step.is_reasoning)  # fmt: skip

    def _decode_step(self, s: _Slot, kv_len: int) -> None:
        """Forward of the last token per row + sampling + bookkeeping, all on the device."""
        _CTX.mask = self._step_mask(s.key_valid, s.arange, s.cache_pos, kv_len, self._dtype)
        _CTX.kv_len = kv_len
        _CTX.last_key = s.cache_pos  # keys after it are masked for every row: not read
        _CTX.split_kv = self._split_kv
        _CTX.layers = s.cache.layers
        logits = self._forward(
            s.cache,
            decode=True,
            input_ids=s.cur[:, None],
            position_ids=s.pos[:, None],
            attention_mask=None,
        )
        s.pos.add_(1)
        s.cache_pos.add_(1)
        self._consume(s, logits)

    # ------------------------------------------------------------------ graphs
    def _snapshot(self, s: _Slot) -> list[tuple[torch.Tensor, torch.Tensor]]:
        saved = [(t, t.clone()) for t in s.tensors().values()]
        for obj in (self.sampler, getattr(self.sampler, "window", None)):
            if obj is not None:
                saved += [(t, t.clone()) for t in _tensor_attrs(obj).values()]
        return saved

    def _capture(self, s: _Slot, buckets: list[int]) -> None:
        """Warm up and capture the decode step for each key bucket; state is restored after."""
        saved = self._snapshot(s)
        gen = getattr(self.sampler, "generator", None)
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for kv_len in buckets:
                    for _ in range(2):
                        self._decode_step(s, kv_len)
            torch.cuda.current_stream().wait_stream(side)
            for kv_len in buckets:
                graph = torch.cuda.CUDAGraph()
                if gen is not None and gen.device.type == "cuda":
                    graph.register_generator_state(gen)
                with torch.cuda.graph(graph, pool=self._pool):
                    self._decode_step(s, kv_len)
                s.graphs[kv_len] = graph
        finally:
            torch.cuda.synchronize()
            for dst, src in saved:
                dst.copy_(src)

    # ------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        temperature_offsets: torch.Tensor | None = None,
    ) -> RolloutOutput:
        """Generate up to ``max_new_tokens`` per row of a LEFT-padded prompt batch (B, P)."""
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids: must be (batch, prompt_len), got {tuple(input_ids.shape)}"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError("attention_mask: must have the shape of input_ids")
        device = input_ids.device
        batch, prompt_len = input_ids.shape
        self._dtype = self._base.get_input_embeddings().weight.dtype
        self._split_kv = self._uses_split_kv(device)
        was_training = self.model.training
        self.model.eval()
        fingerprint = self._fingerprint()
        if self.fused_projections and fingerprint != self._groups_fingerprint:
            groups = ProjectionGroups(self._base)
            # Storage moves at every call on gathered ZeRO-3 weights: say it once, then only
            # on a change.
            if self._groups_fingerprint is None or len(groups) != len(self._groups):
                logger.info("rollout engine: %d projection groups run as one GEMM", len(groups))
            self._groups, self._groups_fingerprint = groups, fingerprint
        if self.fused_norms and fingerprint != self._norms_fingerprint:
            norms = FusedNorms(self._base)
            if norms.summary != self._norms.summary:  # once, then only on a change
                logger.info(norms.summary)
            self._norms, self._norms_fingerprint = norms, fingerprint
        try:
            s = self._get_slot(batch, prompt_len, device)
            self._reset(s, attention_mask, temperature_offsets, prompt_len)
            with self._groups, self._recompile_limit():
                logits = self._prefill(s, input_ids, attention_mask)
                self._consume(s, logits)
                self._set_decode_attention(True)
                try:
                    with self._norms:
                        used_graph = self._decode(s, prompt_len, device, fingerprint)
                finally:
                    self._set_decode_attention(False)
        finally:
            _CTX.mask, _CTX.last_key, _CTX.layers = None, None, []
            self.model.train(was_training)
        self.sampler.check_finite()
        steps = int(s.col)
        width = max(int(s.out_mask.sum(1).max()), 1) if steps else 0
        return RolloutOutput(
            completion_ids=s.out_tokens[:, :width].clone(),
            mask=s.out_mask[:, :width].clone(),
            temperatures=s.out_temperatures[:, :width].clone(),
            entropies=s.out_entropies[:, :width].clone(),
            is_reasoning=s.out_is_reasoning[:, :width].clone(),
            logprobs=s.out_logprobs[:, :width].clone(),
            steps=steps,
            used_cuda_graph=used_graph,
        )

    def _decode(self, s: _Slot, prompt_len: int, device, fingerprint: tuple) -> bool:
        total = self.max_new_tokens
        if total <= 1:
            return False
        first = self._bucket(prompt_len, s.cache_len)
        last = self._bucket(prompt_len + total - 2, s.cache_len)
        buckets = list(range(first, last + 1, self.kv_bucket))
        if buckets[-1] != last:
            buckets.append(last)
        use_graph = self._graphs_wanted(device)
        if not s.graphs or not self._check_done:
            # The first step outside a graph. The engine's very first one runs uncompiled
            # (see _forward) and proves that the attention goes through the interface.
            proving = not self._check_done
            _CTX.calls = 0
            self._decode_step(s, first)
            n_layers = len(s.cache.layers)
            if proving and _CTX.calls != n_layers:
                raise UnsupportedModelError(
                    f"rollout engine: {_CTX.calls} of {n_layers} attention layers dispatched "
                    "through transformers' AttentionInterface during decoding"
                )
            self._check_done = True
            done = 2
        else:
            done = 1
        if use_graph:
            if fingerprint != s.fingerprint:
                s.graphs.clear()
                s.fingerprint = fingerprint
            missing = [b for b in buckets if b not in s.graphs]
            if missing:
                try:
                    self._capture(s, missing)
                except UnsupportedModelError:
                    raise
                except Exception as e:  # noqa: BLE001 - fall back to the eager step
                    self._graph_failed = f"{type(e).__name__}: {e}"
                    s.graphs.clear()
                    gen = getattr(self.sampler, "generator", None)
                    if gen is not None:
                        # A generator registered with a failed capture refuses eager draws
                        # ("Offset increment outside graph capture"): draw from a fresh one.
                        fresh = torch.Generator(gen.device)
                        self.sampler.generator = fresh.manual_seed(gen.initial_seed())
                    logger.warning(
                        "rollout engine: CUDA graph capture failed, decoding eagerly: %s",
                        self._graph_failed,
                    )
                    use_graph = False
        for step in range(done, total):
            if step % self.check_every == 0 and bool(s.finished.all()):
                break
            kv_len = self._bucket(prompt_len + step - 1, s.cache_len)
            if use_graph:
                s.graphs[kv_len].replay()
            else:
                self._decode_step(s, kv_len)
        return use_graph

    _check_done = False
