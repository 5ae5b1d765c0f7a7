"""Sampling through ``MultiTemperatureSampler`` inside Hugging Face ``generate``.

``generate(do_sample=True)`` runs the logits processors and then draws from
``softmax(scores)``. ``MultiTemperatureLogitsProcessor`` draws the token itself with the
sampler and returns scores that are 0 for that token and -inf elsewhere, so generate's
multinomial can only pick it. transformers appends its own warpers (temperature, top-k,
top-p, min-p) after user processors; on such a one-hot row they change nothing, but set the
generation config's ``temperature=1.0, top_k=0, top_p=1.0, min_p=None`` anyway so nothing
else is implied: the sampler's config holds those knobs. Processors that generate runs
before this one (repetition penalty, bad words, ...) act on the logits the sampler sees.

Per step it records tokens, temperatures, entropies, classes and log-probs as device
tensors (no sync); ``result()`` stacks them to (batch, new_tokens), aligned with
``sequences[:, prompt_len:]``: column j is the j-th generated token and the temperature it
was drawn at, i.e. the temperature to divide the logits at position ``prompt_len + j - 1`` by.

Usage::

    proc = MultiTemperatureLogitsProcessor(sampler, eos_token_id=tok.eos_token_id)
    out = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                         logits_processor=LogitsProcessorList([proc]))
    rec = proc.result(out)        # SampledTokens, (batch, new_tokens) each
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from mtrl.sampling.sampler import MultiTemperatureSampler


@dataclass
class SampledTokens:
    """What the sampler did during one ``generate``; (batch, new_tokens) unless noted."""

    tokens: torch.Tensor  # long, the drawn tokens (== sequences[:, prompt_len:] where active)
    temperatures: torch.Tensor  # fp32
    entropies: torch.Tensor  # fp32, nats at T = 1
    is_reasoning: torch.Tensor  # bool
    logprobs: torch.Tensor  # fp32, under the tempered, truncated distribution
    active: torch.Tensor  # bool, False once the row had emitted EOS (its token is padding)
    thresholds: torch.Tensor  # (new_tokens,) fp32

    @property
    def mask(self) -> torch.Tensor:
        """Positions that hold real completion tokens (the EOS itself included)."""
        return self.active


class MultiTemperatureLogitsProcessor(LogitsProcessor):
    """A transformers ``LogitsProcessor`` that samples with a ``MultiTemperatureSampler``.

    ``eos_token_id`` (int or ints) lets it mark finished rows inactive, which keeps the
    padding steps of finished sequences out of the entropy window. ``temperature_offsets``
    ((batch,) tensor, optional) is passed to the sampler on every step.

    State is reset automatically when a new generation starts (the input grows by other
    than one token), or explicitly with ``reset()``.
    """

    def __init__(
        self,
        sampler: MultiTemperatureSampler,
        eos_token_id: int | Iterable[int] | None = None,
        temperature_offsets: torch.Tensor | None = None,
    ):
        self.sampler = sampler
        if eos_token_id is None:
            eos = []
        elif isinstance(eos_token_id, int):
            eos = [eos_token_id]
        else:
            eos = [int(e) for e in eos_token_id]
        self._eos_list = eos
        self.temperature_offsets = temperature_offsets
        self.reset()

    def reset(self) -> None:
        self.prompt_len: int | None = None
        self._last_len: int | None = None
        self._finished: torch.Tensor | None = None
        self._eos: torch.Tensor | None = None
        self._records: dict[str, list[torch.Tensor]] = {
            k: []
            for k in (
                "tokens",
                "temperatures",
                "entropies",
                "is_reasoning",
                "logprobs",
                "active",
                "thresholds",
            )
        }

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        cur_len = input_ids.shape[1]
        if self._last_len is None or cur_len != self._last_len + 1:
            self.reset()
            self.prompt_len = cur_len
            self._finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=scores.device)
            if self._eos_list:
                self._eos = torch.tensor(self._eos_list, device=scores.device)
        elif self._eos is not None:
            self._finished |= torch.isin(input_ids[:, -1], self._eos)
        self._last_len = cur_len

        active = ~self._finished
        step = self.sampler(scores, active=active, temperature_offsets=self.temperature_offsets)
        rec = self._records
        rec["tokens"].append(step.tokens)
        rec["temperatures"].append(step.temperatures)
        rec["entropies"].append(step.entropies)
        rec["is_reasoning"].append(step.is_reasoning)
        rec["logprobs"].append(step.logprobs)
        rec["active"].append(active)
        rec["thresholds"].append(step.threshold)

        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, step.tokens[:, None], 0.0)
        return out

    def result(self, sequences: torch.Tensor | None = None) -> SampledTokens:
        """Stack the recorded steps to (batch, new_tokens).

        Pass generate's output (``sequences`` tensor or the output object) to trim steps
        that generate dropped. Raises ValueError if any logits were NaN/+inf (deferred check).
        """
        self.sampler.check_finite()
        rec = self._records
        if not rec["tokens"]:
            raise ValueError("sampler: nothing recorded; was the processor passed to generate?")
        n = len(rec["tokens"])
        if sequences is not None:
            seq = getattr(sequences, "sequences", sequences)
            n = min(n, seq.shape[1] - self.prompt_len)
        stacked = {k: torch.stack(v[:n], dim=-1) for k, v in rec.items()}
        return SampledTokens(**stacked)
