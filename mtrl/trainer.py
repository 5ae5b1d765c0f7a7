"""MultiTempGRPOTrainer: TRL's GRPOTrainer sampling through the multi-temperature sampler.

Each completion token t is drawn at its own temperature T_t. Every log-prob the loss uses
(policy, old, reference) is log_softmax(logits_{t-1} / T_t)[token_t]: the logits that
predicted token t divided by the temperature token t was drawn at. TRL's fused log-prob
head divides by one scalar (kept at 1); we divide first by scaling the final hidden state
at position t-1 by 1/T_t, which is exact for a bias-free LM head without soft-capping.
Other heads take a plain chunked log-softmax over materialised logits.

Data flow of one rollout batch:

- `_generate_single_turn` samples through `mtrl.rollout.generate` (the one path, shared with
  evaluation) and returns TRL's own pair: completion ids and the sampling log-probs, which
  TRL turns into `sampling_per_token_logps` of the batch.
- TRL 1.16 has no slot for the other per-token tensors between `_generate_single_turn` and
  the old/reference log-prob forwards it runs inside `_generate_and_score_completions`, so
  the rollout waits in `self._rollout` for exactly that one call, which then adds
  `temperatures`, `entropies` and `is_reasoning` to the batch (aligned with
  `completion_ids`) and clears it.
- `_get_per_token_logps_and_entropies(..., temperatures=...)` takes the temperatures as an
  argument. TRL's own call sites pass a fixed set of keywords, so for the one super() call
  that makes them (`_compute_loss`: the batch's `temperatures`; `_generate_and_score_
  completions`: the rollout's) `_log_probs_at` binds the argument with functools.partial.
- Sampler metrics go into TRL's `_metrics`, hence into the logs every callback receives;
  `entropy_histogram()` gives the last rollout's entropy histogram.

TRL methods overridden (what a TRL upgrade must re-check):

- `_generate_single_turn`: TRL's generate takes no logits processor; ours samples each token
  through the sampler (fast engine or transformers generate) and returns its log-probs.
- `_generate_and_score_completions`: scores old/reference log-probs at the rollout's
  temperatures; adds the per-token tensors, the importance-sampling ratio and sampler metrics.
- `_get_per_token_logps_and_entropies`: divides each position by its token's temperature.
- `_compute_loss`: log-probs at the batch's temperatures; importance-sampling weight (TRL
  applies its own correction only on its vLLM path).
- `_save_checkpoint`: writes the checkpoint under .staging/ and renames it into place.
- `_prepare_inputs`: with `dynamic_sampling` on, TRL's one generation of a generation batch
  becomes rounds of generation that drop zero-variance groups (`_dynamic_sampling_rounds`);
  TRL's buffering (shuffle, split into micro-batches, reuse) is unchanged.
- `_calculate_rewards`: keeps the round's gathered rewards, which dynamic sampling judges.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model
from transformers.trainer_utils import rotate_checkpoints
from trl import GRPOTrainer
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import RepeatSampler, pad

from mtrl.config import DynamicSamplingConfig, RolloutConfig
from mtrl.rewards import pop_scoring_counts
from mtrl.rollout import (
    RolloutEngine,
    RolloutOutput,
    decline_mirror,
    engine_for,
    fuse_projections,
    generate,
    is_mirror,
    mirror_for,
    wants_engine,
)
from mtrl.sampling import MultiTemperatureConfig, MultiTemperatureSampler

logger = logging.getLogger(__name__)

# TRL 1.16 reads transformers' deprecated `model.is_gradient_checkpointing` on every rollout
# (trl/models/utils.py, unwrap_model_for_generation); the warning is about TRL's code.
warnings.filterwarnings(
    "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
)


@dataclass
class RolloutStats:
    """Per-token sampler records of one rollout batch, (batch, completion_len) each."""

    temperatures: torch.Tensor  # fp32, temperature each token was drawn at
    entropies: torch.Tensor  # fp32, nats at T = 1
    is_reasoning: torch.Tensor  # bool
    logprobs: torch.Tensor  # fp32, of each token under the distribution it was drawn from
    mask: torch.Tensor  # bool, real completion tokens

    def entropy_histogram(self, bins: int = 40) -> dict:
        """Histogram of completion-token entropies, overall and per class (for MLflow)."""
        entropies = self.entropies[self.mask].float().cpu()
        reasoning = self.is_reasoning[self.mask].cpu()
        high = float(entropies.max()) if entropies.numel() else 1.0
        edges = torch.linspace(0.0, max(high, 1e-6), bins + 1)

        def counts(x: torch.Tensor) -> list[int]:
            return torch.histogram(x, bins=edges).hist.long().tolist() if x.numel() else []

        return {
            "bin_edges_nats": edges.tolist(),
            "all": counts(entropies),
            "reasoning": counts(entropies[reasoning]),
            "knowledge": counts(entropies[~reasoning]),
        }


def _fit(x: torch.Tensor, length: int, fill: float) -> torch.Tensor:
    """Cut or right-pad the last dimension of x to `length`."""
    if x.size(1) >= length:
        return x[:, :length]
    return torch.nn.functional.pad(x, (0, length - x.size(1)), value=fill)


def _group_rows(batch: dict, groups: torch.Tensor, group_size: int) -> dict:
    """The rows of `groups` (indices of consecutive blocks of `group_size` rows) of a scored
    batch; `num_items_in_batch`, which spans the whole batch, is left out."""
    rows = (groups[:, None] * group_size + torch.arange(group_size, device=groups.device)).flatten()
    return {k: v[rows.to(v.device)] for k, v in batch.items() if k != "num_items_in_batch"}


def _cat_batches(batches: list[dict], pad_values: dict[str, tuple[float, str]]) -> dict:
    """Batches joined row-wise; a per-token tensor is padded to the widest on its padding side
    (left for prompts, right for completions)."""
    out = {}
    for key in batches[0]:
        if key not in pad_values:  # a key a TRL upgrade added: its padding must be decided
            raise ValueError(f"dynamic sampling: no padding rule for batch key '{key}'")
        value, side = pad_values[key]
        parts = [b[key] for b in batches]
        if parts[0].dim() == 1:
            out[key] = torch.cat(parts)
            continue
        width = max(p.size(1) for p in parts)
        out[key] = torch.cat([_widen(p, width, side, value) for p in parts])
    return out


def _widen(x: torch.Tensor, width: int, side: str, fill: float) -> torch.Tensor:
    """Pad the last dimension of x to `width` on `side` ("left" or "right")."""
    missing = width - x.size(1)
    return torch.nn.functional.pad(x, (0, missing) if side == "right" else (missing, 0), value=fill)


class _HiddenScale:
    """Forward hook on the backbone: within `dividing(...)`, the final hidden state at position
    p is divided by the temperature of token p+1 (outside, the hook passes it through).

    A hook keeps TRL's fused chunked log-prob head and its memory profile: the head itself is
    unchanged and sees already-divided hidden states. The scale exists only for the one
    forward inside the block.
    """

    def __init__(self):
        self._scale: torch.Tensor | None = None

    def hook(self, module, args, output):
        if self._scale is not None:
            hidden = output.last_hidden_state
            output.last_hidden_state = hidden * self._scale[..., None].to(hidden.dtype)
        return output

    @contextmanager
    def dividing(self, temperatures: torch.Tensor, seq_len: int):
        """`temperatures`: (batch, k), of the last k tokens of sequences of length `seq_len`."""
        k = temperatures.size(1)
        scale = torch.ones(temperatures.size(0), seq_len, device=temperatures.device)
        scale[:, seq_len - k - 1 : seq_len - 1] = 1.0 / temperatures.float()
        self._scale = scale
        try:
            yield
        finally:
            self._scale = None


class MultiTempGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose rollouts and log-probs use per-token temperatures.

    `sampler_config` configures the sampler (temperatures, top-k/top-p/min-p); GRPOConfig's
    own temperature/top_p/top_k/min_p must stay neutral. `rollout_config` picks the generation
    backend (`engine`: auto, fast, hf) and the importance-sampling correction of the sampling
    log-probs. `dynamic_sampling_config` turns on DAPO's dynamic sampling (filter groups).
    """

    def __init__(
        self,
        *args,
        sampler_config: MultiTemperatureConfig | None = None,
        rollout_config: RolloutConfig | None = None,
        dynamic_sampling_config: DynamicSamplingConfig | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.rollout_config = rollout_config or RolloutConfig()
        self.dynamic_sampling = self._checked_dynamic_sampling(dynamic_sampling_config)
        if self.temperature != 1.0 or self.top_p != 1.0 or self.top_k or self.min_p:
            raise ValueError(
                "MultiTempGRPOTrainer: leave GRPOConfig temperature/top_p/top_k/min_p at their "
                "neutral values; set them in the sampler config"
            )
        if self.use_vllm or self.use_transformers_continuous_batching:
            raise ValueError(
                "MultiTempGRPOTrainer: rollouts run through mtrl.rollout.generate (fast engine "
                "or transformers generate); turn off use_vllm / continuous batching"
            )
        self.sampler = MultiTemperatureSampler(sampler_config or MultiTemperatureConfig())
        self._rollout: RolloutOutput | None = None  # the rollout being scored, see module doc
        self._last_rollout: RolloutStats | None = None
        self.logprob_path = self._install_hidden_scaling()
        self._zero3 = (
            self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        )
        if self._fast_engine_configured() and not self._zero3:
            # The engine runs q/k/v and gate/up as one GEMM each where their weights are
            # adjacent: make them so now, on the model's device, before the optimizer and any
            # distributed wrapper hold the parameters (training itself is unchanged).
            fused = fuse_projections(self.model)
            logger.info("rollouts: %d q/k/v and gate/up weight groups made adjacent", fused)
        if self._zero3:
            if self.args.ds3_gather_for_generation:
                logger.info(
                    "ZeRO-3: each rollout gathers the full parameters once, %s "
                    "(train.ds3_gather_for_generation=true)",
                    "copies them into the fast engine's own weights and re-partitions them "
                    "before generating (rollout.zero3_weights)"
                    if self._mirrors_weights()
                    else "generates, then re-partitions them",
                )
            else:
                rollout = self.rollout_config
                if rollout.engine == "fast" or rollout.zero3_weights == "copy":
                    key = "engine" if rollout.engine == "fast" else "zero3_weights"
                    raise ValueError(
                        f"rollout.{key}: under ZeRO-3 the fast engine runs on a copy of the "
                        "weights gathered once per rollout; needs "
                        "train.ds3_gather_for_generation=true"
                    )
                logger.info(
                    "ZeRO-3: rollouts gather each layer's parameters on every forward "
                    "(train.ds3_gather_for_generation=false: less memory, much slower)"
                )

    def entropy_histogram(self, bins: int = 40) -> dict | None:
        """Entropy histogram of the last rollout's completion tokens, overall and per class
        (`RolloutStats.entropy_histogram`); None before the first rollout."""
        rollout = self._last_rollout
        return None if rollout is None else rollout.entropy_histogram(bins)

    # --- log-probs at per-token temperatures ----------------------------------------------

    def _install_hidden_scaling(self) -> str:
        """Hook the backbones (policy and reference) to scale their final hidden states."""
        models = [self.model] + ([self.ref_model] if self.ref_model is not None else [])
        for model in models:
            causal_lm = model.get_base_model() if is_peft_model(model) else model
            head = causal_lm.get_output_embeddings()
            text_config = causal_lm.config.get_text_config()
            if head.bias is not None or getattr(text_config, "final_logit_softcapping", None):
                logger.info(
                    "log-probs at per-token temperatures: chunked log-softmax over materialised "
                    "logits (the LM head has a bias or soft-capping, so hidden scaling is inexact)"
                )
                return "chunked_log_softmax"
        self._hidden_scale = _HiddenScale()
        for model in models:
            causal_lm = model.get_base_model() if is_peft_model(model) else model
            causal_lm.base_model.register_forward_hook(self._hidden_scale.hook)
        logger.info(
            "log-probs at per-token temperatures: final hidden state scaled by 1/T "
            "(exact: bias-free LM head, no soft-capping), TRL's fused log-prob head kept"
        )
        return "hidden_scale"

    def _bind_temperatures(self, temperatures: torch.Tensor) -> None:
        """TRL's calls of `_get_per_token_logps_and_entropies` pass `temperatures` from now on.

        TRL 1.16 calls it with a fixed set of keywords (in `_compute_loss` and
        `_generate_and_score_completions`); this instance attribute shadows the method with
        the argument bound, until `_unbind_temperatures`.
        """
        self._get_per_token_logps_and_entropies = functools.partial(
            type(self)._get_per_token_logps_and_entropies, self, temperatures=temperatures
        )

    def _unbind_temperatures(self) -> None:
        self.__dict__.pop("_get_per_token_logps_and_entropies", None)

    @contextmanager
    def _log_probs_at(self, temperatures: torch.Tensor):
        """Within: TRL's log-prob calls score at `temperatures` (batch, completion_len)."""
        self._bind_temperatures(temperatures)
        try:
            yield
        finally:
            self._unbind_temperatures()

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        temperatures: torch.Tensor | None = None,
        **kwargs,
    ):
        """TRL's log-probs with `temperatures` (batch, completion_len): the temperature each
        completion token was drawn at divides the logits that predicted it. None: T = 1."""
        # Why: TRL's fused head divides every logit by one scalar temperature; each completion
        # token here needs the temperature it was drawn at.
        if temperatures is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, **kwargs
            )
        unsupported = [
            k for k, v in kwargs.items() if v is not None and k.startswith(("pixel", "image"))
        ]
        if unsupported:
            raise ValueError(f"MultiTempGRPOTrainer supports text-only models; got {unsupported}")
        temperatures = _fit(temperatures, logits_to_keep, 1.0).to(input_ids.device)
        batch_size = batch_size or input_ids.size(0)
        chunks = []
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            if self.logprob_path == "hidden_scale":
                with self._hidden_scale.dividing(temperatures[rows], input_ids.size(1)):
                    chunks.append(
                        super()._get_per_token_logps_and_entropies(
                            model, input_ids[rows], attention_mask[rows], logits_to_keep, **kwargs
                        )
                    )
            else:
                chunks.append(
                    self._chunked_logps(
                        model,
                        input_ids[rows],
                        attention_mask[rows],
                        temperatures[rows],
                        kwargs.get("compute_entropy", False),
                    )
                )
        logps = torch.cat([c[0] for c in chunks])
        entropies = torch.cat([c[1] for c in chunks]) if chunks[0][1] is not None else None
        aux = [c[2] for c in chunks if c[2] is not None]
        return logps, entropies, torch.stack(aux).mean() if aux else None

    def _chunked_logps(self, model, input_ids, attention_mask, temperatures, compute_entropy):
        """log_softmax(logits_{t-1} / T_t)[token_t] from materialised logits, for any LM head."""
        k = temperatures.size(1)
        with self.accelerator.autocast():
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=k + 1
            ).logits
        logits = logits[:, :-1].float() / temperatures[..., None]
        log_probs = logits.log_softmax(dim=-1)
        logps = log_probs.gather(-1, input_ids[:, -k:, None]).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1) if compute_entropy else None
        return logps, entropy, None

    # --- rollouts -----------------------------------------------------------------------

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        # Why: TRL's generate call takes no logits processor; ours samples each token through
        # the multi-temperature sampler and records its temperature, entropy and class.
        if images is not None or multimodal_fields:
            raise ValueError("MultiTempGRPOTrainer supports text-only prompts")
        device = self.accelerator.device
        self.sampler.step = self.state.global_step
        prompts = [torch.tensor(ids) for ids in prompt_ids]
        input_ids = pad(
            prompts,
            padding_value=self._tokenizer.pad_token_id,
            padding_side="left",
            pad_to_multiple_of=self.pad_to_multiple_of,
        ).to(device)
        attention_mask = pad(
            [torch.ones_like(p) for p in prompts],
            padding_value=0,
            padding_side="left",
            pad_to_multiple_of=self.pad_to_multiple_of,
        ).to(device)
        offsets = None
        if self.sampler.config.rollout_offsets or self.sampler.config.rollout_offset_values:
            offsets = self.sampler.offsets_tensor(
                num_generations,
                len(prompt_ids),
                first_index=self.accelerator.process_index * len(prompt_ids),
            ).to(device)
        started = time.perf_counter()
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            mirror = self._refreshed_mirror(unwrapped_model, started)
            if mirror is None:
                out = self._sample(unwrapped_model, input_ids, attention_mask, offsets)
        if mirror is not None:
            # ZeRO-3: the gathered parameters are partitioned again; the engine reads its copy.
            out = self._sample(mirror, input_ids, attention_mask, offsets)
        self._rollout = out
        # Old and reference log-probs are scored inside this same TRL call: at these
        # temperatures (the binding ends with `_generate_and_score_completions`).
        self._bind_temperatures(out.temperatures)
        lengths = out.lengths.tolist()
        completion_ids = [
            row[:n].tolist() for row, n in zip(out.completion_ids.cpu(), lengths, strict=True)
        ]
        logprobs = [row[:n].tolist() for row, n in zip(out.logprobs.cpu(), lengths, strict=True)]
        return completion_ids, logprobs

    def _sample(self, model, input_ids, attention_mask, offsets) -> RolloutOutput:
        """One rollout of `model` through `mtrl.rollout.generate` (engine or transformers)."""
        return generate(
            model,
            input_ids,
            attention_mask,
            sampler=self.sampler,
            max_new_tokens=self.max_completion_length,
            eos_token_ids=self.eos_token_ids,
            pad_token_id=self._tokenizer.pad_token_id,
            engine=self._rollout_engine(model),
            temperature_offsets=offsets,
            generation_config=self.generation_config,
        )

    def _refreshed_mirror(self, model, started: float):
        """Under ZeRO-3 with the engine: the weight mirror's model (`mtrl.rollout.mirror`), its
        values copied from the gathered `model` now (so: inside the gather); else None, and
        rollouts generate from `model` itself.

        Logs `rollout/weight_copy_s`: seconds from `started` (before the gather) to the end of
        the copy, i.e. gather + copy.
        """
        if not (self._mirrors_weights() and self._fast_engine_configured()):
            return None
        rollout = self.rollout_config
        mirror = mirror_for(model, "copy" if rollout.engine == "fast" else rollout.zero3_weights)
        if mirror is not None and self._rollout_engine(mirror.model) is None:
            # The engine can't serve this architecture: generate needs no copy.
            decline_mirror(model, "the fast engine can't serve this model")
            mirror = None
        if mirror is None:
            return None
        mirror.refresh(model)
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize()  # the copy runs asynchronously: time all of it
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["rollout/weight_copy_s"].append(time.perf_counter() - started)
        return mirror.model

    def _mirrors_weights(self) -> bool:
        """Whether ZeRO-3 rollouts may run the engine on a weight mirror: one gather per
        rollout to copy from, an engine that may run, rollout.zero3_weights not `generate`."""
        rollout = self.rollout_config
        return (
            self._zero3
            and self.args.ds3_gather_for_generation
            and rollout.engine != "hf"
            and (rollout.engine == "fast" or rollout.zero3_weights != "generate")
        )

    def _rollout_engine(self, model) -> RolloutEngine | None:
        """The fast engine for `model` when configured and supported, else None (generate)."""
        if not self._fast_engine_configured():
            return None
        if self._zero3 and not is_mirror(model):
            # Gathered ZeRO-3 weights move at every gather; the engine serves their mirror.
            return None
        return engine_for(
            model,
            self.sampler,
            "train",
            max_new_tokens=self.max_completion_length,
            eos_token_ids=self.eos_token_ids,
            pad_token_id=self._tokenizer.pad_token_id,
            **self.rollout_config.engine_options(self.accelerator.device),
        )

    def _fast_engine_configured(self) -> bool:
        """Whether rollouts should try the fast engine (rollout.engine, device, ZeRO stage)."""
        return wants_engine(
            self.rollout_config.engine,
            self.accelerator.device,
            self._zero3,
            mirror=self._mirrors_weights(),
        )

    def _generate_and_score_completions(self, inputs):
        # Why: the old and reference log-probs TRL scores here need the rollout's per-token
        # temperatures, which must then travel with the batch to the loss.
        try:
            output = super()._generate_and_score_completions(inputs)
            rollout = self._rollout
        finally:
            self._rollout = None
            self._unbind_temperatures()
        width = output["completion_ids"].size(1)
        output["temperatures"] = _fit(rollout.temperatures, width, 1.0)
        output["entropies"] = _fit(rollout.entropies, width, 0.0)
        output["is_reasoning"] = _fit(rollout.is_reasoning, width, False)
        if self.rollout_config.importance_sampling:
            output["importance_sampling_ratio"] = self._importance_ratio(output)
        self._last_rollout = RolloutStats(
            temperatures=rollout.temperatures,
            entropies=rollout.entropies,
            is_reasoning=rollout.is_reasoning,
            logprobs=rollout.logprobs,
            mask=rollout.mask,
        )
        self._log_sampler_metrics(self._last_rollout)
        self._log_scoring_counts()
        return output

    def _log_scoring_counts(self) -> None:
        """Count completions whose sandboxed scorer timed out or crashed, summed over processes.

        Those completions are scored as wrong answers: 0, or -1 for dapo (mtrl.rewards); the
        counts go into TRL's metrics as `rewards/<name>/timeouts` and `rewards/<name>/crashes`.
        """
        counts = pop_scoring_counts()  # every process scores with the same rewards: same keys
        if not counts:
            return
        keys = sorted(counts)
        local = torch.tensor([counts[k] for k in keys], device=self.accelerator.device)
        totals = self.accelerator.gather(local[None]).sum(0).tolist()
        metrics = self._metrics["train" if self.model.training else "eval"]
        for key, total in zip(keys, totals, strict=True):
            metrics[key].append(total)

    def _importance_ratio(self, batch: dict) -> torch.Tensor:
        """min(p_train / p_sample, cap) per completion token, (batch, completion_len).

        p_train is the training forward's probability of the token at its temperature (TRL's
        old log-probs when it computed them), p_sample the one the rollout drew it from
        (`sampling_per_token_logps`).
        """
        width = batch["completion_ids"].size(1)
        mask = batch["completion_mask"].bool()
        old = batch.get("old_per_token_logps")
        if old is None:
            input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
            attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
            with torch.no_grad():
                old, _, _ = self._get_per_token_logps_and_entropies(
                    self.model,
                    input_ids,
                    attention_mask,
                    width,
                    batch_size=self.args.per_device_train_batch_size,
                    temperatures=batch["temperatures"],
                )
        sampling = _fit(batch["sampling_per_token_logps"], width, 0.0).to(old.device)
        ratio = torch.exp((old - sampling).masked_fill(~mask, 0.0))
        cap = self.rollout_config.importance_sampling_cap
        mode = "train" if self.model.training else "eval"
        summary = torch.stack(
            [(ratio * mask).sum(), (ratio * mask).amax(), ((ratio > cap) & mask).sum(), mask.sum()]
        ).float()
        gathered = self.accelerator.gather(summary[None])
        total, n = gathered[:, 0].sum(), gathered[:, 3].sum().clamp(min=1)
        metrics = self._metrics[mode]
        metrics["sampling/importance_ratio/mean"].append((total / n).item())
        metrics["sampling/importance_ratio/max"].append(gathered[:, 1].max().item())
        metrics["sampling/importance_ratio/clipped_share"].append((gathered[:, 2].sum() / n).item())
        return ratio.clamp(max=cap)

    def _compute_loss(self, model, inputs):
        # Why: the policy log-probs of the loss must use each token's sampling temperature,
        # and TRL 1.16 applies its importance-sampling correction only when `use_vllm` is on
        # (both where it computes the ratio and where it weights the loss), which would also
        # send generation to vLLM. A weight r >= 0 on the advantage gives the corrected
        # per-token loss, as -min(r A c1, r A c2) = -r min(A c1, A c2).
        ratio = inputs.get("importance_sampling_ratio")
        if ratio is not None:
            inputs = {**inputs, "advantages": inputs["advantages"][:, None] * ratio}
        with self._log_probs_at(inputs["temperatures"]):
            return super()._compute_loss(model, inputs)

    def _log_sampler_metrics(self, stats: RolloutStats) -> None:
        mode = "train" if self.model.training else "eval"
        mask = stats.mask
        reasoning = stats.is_reasoning & mask
        knowledge = ~stats.is_reasoning & mask
        sums = torch.stack(
            [
                mask.sum(),
                reasoning.sum(),
                (stats.entropies * reasoning).sum(),
                (stats.entropies * knowledge).sum(),
                (stats.temperatures * reasoning).sum(),
                (stats.temperatures * knowledge).sum(),
                (stats.entropies * mask).sum(),
            ]
        ).float()
        total, n_reason, ent_r, ent_k, temp_r, temp_k, ent_all = (
            self.accelerator.gather(sums[None]).sum(0).tolist()
        )
        n_know = total - n_reason
        metrics = self._metrics[mode]
        metrics["sampler/reasoning_share"].append(n_reason / max(total, 1))
        metrics["sampler/entropy_mean"].append(ent_all / max(total, 1))
        if n_reason:
            metrics["sampler/reasoning/entropy_mean"].append(ent_r / n_reason)
            metrics["sampler/reasoning/temperature_mean"].append(temp_r / n_reason)
        if n_know:
            metrics["sampler/knowledge/entropy_mean"].append(ent_k / n_know)
            metrics["sampler/knowledge/temperature_mean"].append(temp_k / n_know)
        if self.sampler.last_threshold is not None:
            metrics["sampler/threshold"].append(float(self.sampler.last_threshold))
        for name, value in self.sampler.scheduled_values().items():
            metrics[f"sampler/scheduled/{name}"].append(value)

    # --- dynamic sampling (DAPO's filter groups) -----------------------------------------

    def _checked_dynamic_sampling(
        self, config: DynamicSamplingConfig | None
    ) -> DynamicSamplingConfig:
        """`config` checked against this trainer's rewards, batch sizes and dataset."""
        config = (config or DynamicSamplingConfig()).validate(
            list(self.reward_func_names),
            self.args.per_device_train_batch_size * self.args.steps_per_generation,
            self.num_generations,
        )
        if config.enabled and isinstance(self.train_dataset, torch.utils.data.IterableDataset):
            raise ValueError(
                "dynamic_sampling.enabled: needs a map-style training dataset (extra rounds "
                "draw prompts by index), got an iterable one"
            )
        self._round_rewards: torch.Tensor | None = None
        # Extra rounds' prompts (`_dynamic_sampling_prompts`), made on first use.
        self._extra_dataset = self._extra_sampler = self._extra_prompts = None
        return config

    def _prepare_inputs(self, generation_batch):
        # Why: DAPO's dynamic sampling replaces the groups whose rewards are all equal (zero
        # advantage) by groups from further generation rounds. TRL's buffering around the one
        # `_generate_and_score_completions` call of a generation batch stays TRL's: within this
        # call an instance attribute routes that call to the rounds.
        if not (self.dynamic_sampling.enabled and self.model.training):
            return super()._prepare_inputs(generation_batch)
        self._generate_and_score_completions = self._dynamic_sampling_rounds
        try:
            return super()._prepare_inputs(generation_batch)
        finally:
            del self._generate_and_score_completions

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # Why: dynamic sampling judges each group by its rewards, which TRL keeps inside
        # `_generate_and_score_completions`; (rows of all processes, reward functions).
        self._round_rewards = super()._calculate_rewards(
            inputs, prompts, completions, completion_ids_list
        )
        return self._round_rewards

    def _dynamic_sampling_rounds(self, inputs: list[dict]) -> dict:
        """The generation batch `inputs` (this process's rows: groups of num_generations
        consecutive rows) generated and scored, each zero-variance group replaced by a group
        with variance from a further round on fresh prompts, for at most `max_rounds` rounds.

        Every round generates a full generation batch (the fast engine's captured graphs fit
        every round) and every process runs the same number of rounds (their collectives must
        match). At the cap, dropped zero-variance groups fill the batch (zero advantage): TRL
        splits exactly per_device_train_batch_size x steps_per_generation rows per process.
        """
        n = self.num_generations
        wanted = len(inputs) // n  # groups per process
        kept: list[dict] = []  # row subsets of each round's output: groups with variance
        spare: list[dict] = []  # and zero-variance groups, for filling at the cap
        n_kept = n_spare = varied = flat = rounds = 0
        while True:
            batch = inputs if rounds == 0 else self._dynamic_sampling_prompts(len(inputs))
            output = type(self)._generate_and_score_completions(self, batch)
            rounds += 1
            informative = self._informative_groups(len(batch))
            varied += int(informative.sum())
            flat += int((~informative).sum())
            take = informative.nonzero().flatten()[: wanted - n_kept]
            kept.append(_group_rows(output, take, n))
            n_kept += take.numel()
            spares = (~informative).nonzero().flatten()[: wanted - n_spare]
            spare.append(_group_rows(output, spares, n))
            n_spare += spares.numel()
            short = self.accelerator.gather(
                torch.tensor([wanted - n_kept], device=self.accelerator.device)
            )
            if short.max() == 0 or rounds == self.dynamic_sampling.max_rounds:
                break
        filled = wanted - n_kept
        batch = _cat_batches(
            kept + [_group_rows(_cat_batches(spare, self._pad_values), torch.arange(filled), n)],
            self._pad_values,
        )
        loss_mask = batch["completion_mask"] * batch.get("tool_mask", 1)
        batch["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()

        counts = torch.tensor([varied, flat, n_kept, filled], device=self.accelerator.device)
        varied, flat, n_kept, filled = self.accelerator.gather(counts[None]).sum(0).tolist()
        metrics = self._metrics["train"]
        metrics["dynamic_sampling/rounds"].append(rounds)
        metrics["dynamic_sampling/groups_kept"].append(n_kept)  # with variance, in the batch
        metrics["dynamic_sampling/groups_dropped"].append(flat - filled)  # zero variance, out
        metrics["dynamic_sampling/groups_filled"].append(filled)  # zero variance, in (at cap)
        metrics["dynamic_sampling/groups_surplus"].append(varied - n_kept)  # beyond the batch
        metrics["dynamic_sampling/stopped_at_cap"].append(float(short.max() > 0))
        return batch

    def _informative_groups(self, rows: int) -> torch.Tensor:
        """(rows // num_generations,) bool: which of this process's groups of the round just
        scored have unequal `dynamic_sampling.metric` values (NaN, unscorable, ignored)."""
        rewards, self._round_rewards = self._round_rewards, None
        if self.dynamic_sampling.metric == "reward":  # the weighted total, as TRL sums it
            values = (rewards * self.reward_weights.to(rewards.device)).nansum(dim=1)
            values[torch.isnan(rewards).all(dim=1)] = torch.nan
        else:
            values = rewards[:, self.reward_func_names.index(self.dynamic_sampling.metric)]
        start = self.accelerator.process_index * rows  # TRL gathers rows in process order
        grouped = values[start : start + rows].view(-1, self.num_generations)
        low = grouped.nan_to_num(nan=torch.inf).amin(dim=1)
        high = grouped.nan_to_num(nan=-torch.inf).amax(dim=1)
        return high > low

    def _dynamic_sampling_prompts(self, rows: int) -> list[dict]:
        """This process's `rows` rows of a fresh generation batch for an extra round.

        TRL's RepeatSampler order (each prompt num_generations times in a row), with a seed of
        its own so that extra rounds do not replay the prompts of the coming steps, cut the
        way accelerate shards TRL's dataloader: every process draws the same global batch and
        takes its consecutive slice of it.
        """
        size = self.args.generation_batch_size  # rows of all processes
        if self._extra_sampler is None:
            self._extra_dataset = self._remove_unused_columns(
                self.train_dataset, description="dynamic sampling"
            )
            self._extra_sampler = RepeatSampler(
                data_source=self._extra_dataset,
                mini_repeat_count=self.num_generations,
                batch_size=size // self.num_generations,
                shuffle=self.shuffle_dataset,
                seed=self.args.seed + 1,
            )
        for new_pass in (False, True):  # at the end of a pass, a new pass: a new permutation
            if new_pass or self._extra_prompts is None:
                self._extra_prompts = iter(self._extra_sampler)
            indices = list(itertools.islice(self._extra_prompts, size))
            if len(indices) == size:  # RepeatSampler yields whole batches only
                break
        else:
            raise ValueError("dynamic sampling: the training dataset is smaller than one batch")
        start = self.accelerator.process_index * rows
        return [self._extra_dataset[i] for i in indices[start : start + rows]]

    @property
    def _pad_values(self) -> dict[str, tuple[float, str]]:
        """Batch key -> (padding value, side) for joining rows of different rounds."""
        pad_id = self._tokenizer.pad_token_id
        return {
            "prompt_ids": (pad_id, "left"),
            "prompt_mask": (0, "left"),
            "completion_ids": (pad_id, "right"),
            "completion_mask": (0, "right"),
            "tool_mask": (1, "right"),
            "old_per_token_logps": (0.0, "right"),
            "ref_per_token_logps": (0.0, "right"),
            "sampling_per_token_logps": (0.0, "right"),
            "importance_sampling_ratio": (1.0, "right"),
            "temperatures": (1.0, "right"),
            "entropies": (0.0, "right"),
            "is_reasoning": (False, "right"),
            "advantages": (0.0, "right"),
        }

    # --- checkpoints --------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        # Why: transformers writes checkpoint-N in place, so a crash mid-save would leave a
        # half-written checkpoint as the latest. Write it under .staging/, then rename.
        final_root = self.args.output_dir
        name = f"checkpoint-{self.state.global_step}"
        staging_root = os.path.join(final_root, ".staging")
        self.args.output_dir = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = final_root
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            target = os.path.join(final_root, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging_root, name), target)
            rotate_checkpoints(
                output_dir=final_root,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
            )
        self.accelerator.wait_for_everyone()
