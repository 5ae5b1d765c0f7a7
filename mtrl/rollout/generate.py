"""The one generation path of training and evaluation.

    from mtrl.rollout import engine_for, generate
    engine = engine_for(model, sampler, "train", max_new_tokens=256, eos_token_ids=[eos],
                        pad_token_id=pad)          # None where the engine can't serve
    out = generate(model, input_ids, attention_mask, sampler=sampler, max_new_tokens=256,
                   eos_token_ids=[eos], pad_token_id=pad, engine=engine)
    out.completion_ids, out.mask, out.temperatures, out.entropies, out.is_reasoning, out.logprobs

Backends: the fast engine (``mtrl.rollout.engine``: static KV cache, CUDA-graph decode step)
when ``engine`` is given, else transformers ``generate`` sampling through the same sampler as a
logits processor. An engine that finds out during a call that it can't serve the model
(``UnsupportedModelError``) is dropped for that model and the call falls back to ``generate``.
One log line says which backend a model generates with, again only when that changes.

EOS: whatever the backend, a row's completion is its tokens up to and including its first
EOS (``completion_mask``, the only place this rule lives); everything after is padding:
``pad_token_id``, temperature 1.0, entropy 0.0, not reasoning, log-prob 0.0.

ZeRO-3: the engine serves a weight mirror of the gathered model (``mtrl.rollout.mirror``), whose
tensors never move, so its graphs survive the re-gathering; the trainer builds and refreshes it.

Engine cache: ``engine_for`` keeps one engine per (model, role) (roles: ``"train"``,
``"eval"``), so rollouts and periodic evaluation each keep their static cache and captured
graphs from call to call; asking for a role with another sampler or length replaces (and
frees) that role's engine.
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Iterable

import torch

from mtrl.rollout.engine import RolloutEngine, RolloutOutput, UnsupportedModelError

logger = logging.getLogger(__name__)

# model -> {role: engine}; model -> why the engine can't serve it; model -> last backend line
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_REFUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ANNOUNCED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

ENGINE_LINE = "generation: fast engine (static KV cache, CUDA-graph decode step)"


def wants_engine(choice: str, device: torch.device, zero3: bool, mirror: bool = False) -> bool:
    """Whether to try the fast engine for ``rollout.engine`` = ``choice`` (auto, fast, hf).

    ``mirror``: under ZeRO-3, the caller runs the engine on a weight mirror
    (``mtrl.rollout.mirror``), refreshed from each rollout's gather.
    """
    if choice == "auto":
        # ZeRO-3 re-gathers the parameters into new storage every rollout: graphs captured on
        # the gathered weights would not survive it, graphs on a mirror's weights do.
        return (mirror or not zero3) and torch.device(device).type == "cuda"
    return choice == "fast"


def engine_for(
    model,
    sampler,
    role: str,
    *,
    max_new_tokens: int,
    eos_token_ids: int | Iterable[int] | None,
    pad_token_id: int,
    **options,
) -> RolloutEngine | None:
    """The cached engine of ``model`` for ``role``, built on first use; None if it can't serve.

    ``options`` go to ``RolloutEngine`` (``check_every``, ``compile_decode``, ...).
    """
    if model in _REFUSED:
        return None
    engines = _ENGINES.setdefault(model, {})
    eos = tuple(_eos_list(eos_token_ids))
    key = (id(sampler), int(max_new_tokens), eos, int(pad_token_id), tuple(sorted(options.items())))
    cached = engines.get(role)
    if cached is not None and cached[0] == key:
        return cached[1]
    if cached is not None:
        cached[1].release()
        del engines[role]
    try:
        engine = RolloutEngine(
            model,
            sampler,
            eos_token_ids=list(eos),
            pad_token_id=pad_token_id,
            max_new_tokens=max_new_tokens,
            **options,
        )
    except UnsupportedModelError as exc:
        _refuse(model, exc)
        return None
    engines[role] = (key, engine)
    return engine


def completion_mask(completion_ids: torch.Tensor, eos_token_ids: Iterable[int]) -> torch.Tensor:
    """(B, T) bool: the tokens of each row up to and including its first EOS."""
    eos = torch.tensor(list(eos_token_ids) or [-1], device=completion_ids.device)
    is_eos = torch.isin(completion_ids, eos).int()
    return (is_eos.cumsum(1) - is_eos) == 0


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    sampler,
    max_new_tokens: int,
    eos_token_ids: int | Iterable[int] | None,
    pad_token_id: int,
    engine: RolloutEngine | None = None,
    temperature_offsets: torch.Tensor | None = None,
    generation_config=None,
) -> RolloutOutput:
    """Sample up to ``max_new_tokens`` per row of a LEFT-padded prompt batch (B, P).

    ``sampler`` is a ``MultiTemperatureSampler`` (set its ``step`` first); ``engine`` the
    model's engine from ``engine_for`` or None for transformers ``generate``;
    ``temperature_offsets`` (B,) is added to each row's temperature; ``generation_config``
    (transformers ``generate`` only) carries other generation settings, e.g. a repetition
    penalty, which acts before the sampler. The model runs in eval mode (no dropout), its
    train/eval mode is restored after. Returns ``RolloutOutput``, each field (B, T) with T the
    longest completion.
    """
    eos = _eos_list(eos_token_ids)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    raw = None
    if engine is not None:
        try:
            raw = engine.generate(
                input_ids, attention_mask, temperature_offsets=temperature_offsets
            )
            _announce(model, ENGINE_LINE)
        except UnsupportedModelError as exc:  # found only once the attention runs
            _refuse(model, exc)
    if raw is None:
        if model not in _REFUSED:
            _announce(model, "generation: transformers generate")
        raw = _transformers_generate(
            model,
            input_ids,
            attention_mask,
            sampler,
            max_new_tokens,
            eos,
            pad_token_id,
            temperature_offsets,
            generation_config,
        )
    return _finish(raw, eos, pad_token_id)


def _transformers_generate(
    model, input_ids, attention_mask, sampler, max_new_tokens, eos, pad, offsets, base_config
) -> RolloutOutput:
    """transformers ``generate`` drawing every token through ``sampler``; unmasked records."""
    from transformers import GenerationConfig, LogitsProcessorList

    from mtrl.sampling import MultiTemperatureLogitsProcessor

    processor = MultiTemperatureLogitsProcessor(
        sampler, eos_token_id=eos, temperature_offsets=offsets
    )
    config = GenerationConfig() if base_config is None else copy.deepcopy(base_config)
    # The processor draws the token and returns a one-hot row; the warpers transformers adds
    # after it would change nothing, neutral values say that nothing else is implied.
    config.update(
        max_new_tokens=int(max_new_tokens),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        min_p=None,
        pad_token_id=pad,
        eos_token_id=eos or None,
    )
    was_training = model.training
    model.eval()
    try:
        sequences = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=LogitsProcessorList([processor]),
        )
    finally:
        model.train(was_training)
    rec = processor.result(sequences)  # raises on NaN/inf logits (the deferred check)
    return RolloutOutput(
        completion_ids=sequences[:, input_ids.size(1) :],
        mask=rec.active,
        temperatures=rec.temperatures,
        entropies=rec.entropies,
        is_reasoning=rec.is_reasoning,
        logprobs=rec.logprobs,
        steps=rec.tokens.size(1),
        backend="generate",
    )


def _finish(raw: RolloutOutput, eos: list[int], pad: int) -> RolloutOutput:
    """Mask after the first EOS, put neutral values there, cut to the longest completion."""
    mask = completion_mask(raw.completion_ids, eos)
    width = int(mask.sum(1).max()) if mask.numel() else 0
    mask = mask[:, :width]

    def keep(x: torch.Tensor, fill) -> torch.Tensor:
        return x[:, :width].masked_fill(~mask, fill)

    return RolloutOutput(
        completion_ids=keep(raw.completion_ids, pad),
        mask=mask,
        temperatures=keep(raw.temperatures.float(), 1.0),
        entropies=keep(raw.entropies.float(), 0.0),
        is_reasoning=keep(raw.is_reasoning, False),
        logprobs=keep(raw.logprobs.float(), 0.0),
        steps=raw.steps,
        used_cuda_graph=raw.used_cuda_graph,
        backend=raw.backend,
    )


def _eos_list(eos_token_ids: int | Iterable[int] | None) -> list[int]:
    if eos_token_ids is None:
        return []
    if isinstance(eos_token_ids, int):
        return [eos_token_ids]
    return [int(e) for e in eos_token_ids]


def _refuse(model, exc: Exception) -> None:
    for _, engine in _ENGINES.pop(model, {}).values():
        engine.release()
    _REFUSED[model] = str(exc)
    _announce(model, f"generation: transformers generate, the fast engine can't: {exc}", True)


def _announce(model, line: str, warn: bool = False) -> None:
    if _ANNOUNCED.get(model) != line:
        _ANNOUNCED[model] = line
        (logger.warning if warn else logger.info)(line)
