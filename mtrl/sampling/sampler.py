"""Multi-temperature sampling (arXiv:2510.08892) without host synchronisation per step.

One call takes the raw next-token logits of a decoding step, (batch, vocab), and:

1. computes each row's entropy at T = 1 in fp32 (nats);
2. finds the threshold (``fixed``, ``window`` or ``batch``, see ``MultiTemperatureConfig``)
   and classifies a row as reasoning when ``entropy >= threshold``;
3. picks each row's temperature (high for reasoning, low for knowledge; the single
   temperature in ``mode: single``), adds the rollout offset (in ``mode: multi`` to reasoning
   rows only unless ``offsets_apply_to: all``), clamps to ``min_temperature``;
4. divides the logits by it, then applies top-k, top-p and min-p (in that order);
5. draws a token with the exponential race (``argmax(p / E)``, E ~ Exp(1), which is
   exactly a draw from p) and returns its log-prob under that same distribution.

Steps 1 and 4-5 have two implementations, with the same entropies (to fp32 rounding), hence
the same thresholds, classes and temperatures, and draws from the same distribution:
- torch ops (eager, or inductor's kernels after ``compile()``), with the noise drawn by
  ``exponential_`` on the sampler's generator; they make ~8 passes over the (batch, vocab)
  logits;
- the fused Triton kernels of ``mtrl.sampling.fused`` (``fused=None``: on CUDA devices when no
  top-k / top-p is configured; min-p is supported): one pass for the entropies, one for the
  draw and its log-prob, with the Exp(1) noise made inside the kernel from a seed that
  ``torch.randint`` draws on the sampler's generator, on the device, at each call. This is a
  different random stream than ``exponential_``'s: the same law, not the same tokens.
Steps 2-3 (``_select_temperatures``) are the same torch ops on (batch,) tensors in both.

Window semantics: the window threshold of a step is computed AFTER this step's active
entropies are added, so the current tokens are classified against the window that holds
them and the history before them (at the very first step this equals ``batch`` mode).

Every scheduled value lives in a 0-dim device tensor refreshed when ``step`` is set, so the
call is free of ``.item()`` and can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mtrl.sampling.config import MultiTemperatureConfig
from mtrl.sampling.entropy import token_entropy
from mtrl.sampling.schedules import schedule_value
from mtrl.sampling.threshold import EntropyWindow, masked_quantile
from mtrl.triton_device import triton_runs_on


@dataclass
class SamplerStep:
    """Output of one sampler call; every field is (batch,) except ``threshold`` (0-dim)."""

    tokens: torch.Tensor  # long
    temperatures: torch.Tensor  # fp32, the temperature the token was drawn at
    entropies: torch.Tensor  # fp32, nats, of softmax(logits) at T = 1
    is_reasoning: torch.Tensor  # bool, entropy >= threshold
    logprobs: torch.Tensor  # fp32, log-prob of the token after temperature and truncation
    threshold: torch.Tensor  # fp32, the entropy threshold used at this step


class MultiTemperatureSampler:
    """Sample next tokens at an entropy-dependent temperature.

    ``sampler(logits, active=None, temperature_offsets=None) -> SamplerStep``

    - ``logits``: (batch, vocab), raw (before any temperature), any float dtype.
    - ``active``: optional (batch,) bool; rows that are False (finished sequences) are still
      sampled but left out of the window update and of the batch quantile.
    - ``temperature_offsets``: optional (batch,) float added to each row's temperature
      (rollout-level offsets, see ``rollout_offsets`` / ``offsets_tensor``); in mode multi
      only to reasoning rows unless ``offsets_apply_to: all``.

    Set ``sampler.step`` to the optimizer step before generating; schedules read it.

    ``fused``: run steps 1 and 5 as the Triton kernels of ``mtrl.sampling.fused`` wherever
    they apply (no top-k, no top-p). None (default): on CUDA devices; True: also on the CPU
    when Triton interprets kernels (``TRITON_INTERPRET=1``, the tests); False: never.
    """

    def __init__(
        self,
        config: MultiTemperatureConfig | None = None,
        generator: torch.Generator | None = None,
        fused: bool | None = None,
    ):
        self.config = (config or MultiTemperatureConfig()).validate()
        self.generator = generator
        self.fused = fused
        self._step = 0
        self._device: torch.device | None = None
        self.window: EntropyWindow | None = None
        self.last_threshold: torch.Tensor | None = None
        self._invalid: torch.Tensor | None = None
        self.compile(False)

    # ----------------------------------------------------------------- schedules
    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step = int(value)
        if self._device is not None:
            self._refresh_params()

    def scheduled_values(self) -> dict[str, float]:
        """The scheduled values at the current step, as Python floats (for metrics)."""
        c, s = self.config, self._step
        return {
            "high_temperature": schedule_value(c.high_temperature_schedule, c.high_temperature, s),
            "low_temperature": schedule_value(c.low_temperature_schedule, c.low_temperature, s),
            "temperature": schedule_value(c.temperature_schedule, c.temperature, s),
            "reasoning_fraction": schedule_value(
                c.reasoning_fraction_schedule, c.reasoning_fraction, s
            ),
        }

    def _refresh_params(self) -> None:
        v = self.scheduled_values()
        # fill_ launches a tiny kernel with the value as argument: no sync, same storage,
        # so a captured CUDA graph sees the new values on its next replay.
        self._high.fill_(v["high_temperature"])
        self._low.fill_(v["low_temperature"])
        self._single.fill_(v["temperature"])
        self._q.fill_(1.0 - min(max(v["reasoning_fraction"], 0.0), 1.0))

    def _ensure_state(self, device: torch.device) -> None:
        if self._device == device:
            return
        if self._device is not None:
            raise ValueError(
                f"sampler: logits moved from {self._device} to {device}; "
                "create one sampler per device"
            )
        self._device = device

        def scalar(v: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.full((), v, dtype=dtype, device=device)

        self._high = scalar(0.0)
        self._low = scalar(0.0)
        self._single = scalar(0.0)
        self._q = scalar(0.0, torch.float64)
        self._fixed = scalar(self.config.entropy_threshold)
        self._invalid = torch.zeros((), dtype=torch.bool, device=device)
        if self.config.threshold_mode == "window":
            self.window = EntropyWindow(self.config.window_size, device)
        self._refresh_params()

    def reset_window(self) -> None:
        if self.window is not None:
            self.window.reset()

    def offsets_tensor(
        self, num_generations: int, batch_size: int, first_index: int = 0
    ) -> torch.Tensor:
        """(batch,) offsets for rows laid out as consecutive groups of ``num_generations``.

        Row r belongs to generation ``(first_index + r) % num_generations`` of its group
        (TRL repeats each prompt ``num_generations`` times in a row; ``first_index`` is the
        global index of this process's first row).
        """
        offsets = torch.tensor(self.config.offsets_for(num_generations), dtype=torch.float32)
        rows = (torch.arange(batch_size) + first_index) % num_generations
        out = offsets[rows]
        return out.to(self._device) if self._device is not None else out

    # ----------------------------------------------------------------- validity
    def _check_mode(self, device: torch.device) -> str:
        """The NaN check for logits on ``device``: off, eager (raise now, a host sync) or
        deferred (a device flag that ``check_finite`` reads)."""
        mode = self.config.nan_check
        if mode == "off":
            return "off"
        eager = mode == "eager" or (mode == "auto" and device.type == "cpu")
        return "eager" if eager and not _capturing(device) else "deferred"

    def _check_logits(self, x: torch.Tensor, entropies: torch.Tensor) -> None:
        mode = self._check_mode(x.device)
        if mode == "off":
            return
        # The T = 1 softmax turns NaN, +inf and rows with no finite logit into a NaN
        # entropy, so checking the (batch,) entropies costs no extra pass over the vocab.
        bad = ~torch.isfinite(entropies)
        if mode == "eager":
            if bool(bad.any()):
                raise ValueError(_invalid_message(x, bad))
        else:
            self._invalid |= bad.any()

    def check_finite(self) -> None:
        """Raise ValueError if any logits since the last check were NaN/+inf/all -inf.

        This is the one sync of the deferred check; call it once per generate (the
        logits processor's ``result()`` does).
        """
        if self._invalid is not None and bool(self._invalid):
            self._invalid.zero_()
            raise ValueError(
                "sampler: logits contained NaN or +inf (or a row with every token at -inf) "
                "during this generation; the sampled tokens are not valid"
            )

    # ----------------------------------------------------------------- sampling
    def compile(self, enabled: bool = True) -> None:
        """Run the per-call tensor work through ``torch.compile`` (``enabled=False``: eager).

        For decode loops on CUDA: a call is a few dozen small kernels over (batch, vocab), which
        inductor fuses into a handful; the rollout engine's ``compile_decode`` turns this on.
        The noise stays an eager ``exponential_`` on ``generator``, so the draws come from the
        same random stream either way. On the fused path only steps 2-3 are compiled (the
        Triton kernels run as they are).
        """
        if enabled:
            self._entropy_fn = torch.compile(token_entropy, dynamic=False)
            self._draw_fn = torch.compile(self._draw, dynamic=False)
            self._select_fn = torch.compile(self._select_temperatures, dynamic=False)
        else:
            self._entropy_fn, self._draw_fn = token_entropy, self._draw
            self._select_fn = self._select_temperatures

    def uses_fused(self, device: torch.device | str) -> bool:
        """Whether calls with logits on ``device`` take the fused Triton path."""
        cfg = self.config
        if self.fused is False or cfg.top_k > 0 or cfg.top_p < 1.0:
            return False
        device = torch.device(device)
        if self.fused is None:
            return device.type == "cuda"
        if not triton_runs_on(device):
            raise ValueError(
                f"sampler: fused=True needs logits on CUDA or TRITON_INTERPRET=1, got {device}"
            )
        return True

    def __call__(
        self,
        logits: torch.Tensor,
        active: torch.Tensor | None = None,
        temperature_offsets: torch.Tensor | None = None,
    ) -> SamplerStep:
        if logits.dim() != 2:
            raise ValueError(
                f"sampler: logits must be (batch, vocab), got shape {tuple(logits.shape)}"
            )
        self._ensure_state(logits.device)
        if active is not None:
            active = active.to(device=logits.device, dtype=torch.bool)
        if temperature_offsets is not None:
            temperature_offsets = temperature_offsets.to(logits.device, torch.float32)
        if self.uses_fused(logits.device):
            from mtrl.sampling.fused import fused_draw, fused_entropy

            # A deferred check is a flag the entropy kernel sets: no kernels of its own.
            deferred = self._check_mode(logits.device) == "deferred"
            entropies, row_max = fused_entropy(
                logits, return_max=True, invalid=self._invalid if deferred else None
            )
            if not deferred:
                self._check_logits(logits, entropies)
            temperatures, is_reasoning, threshold = self._select_fn(
                entropies, active, temperature_offsets
            )
            # drawn on the device: a replayed CUDA graph gets a fresh seed each time
            seed = torch.randint(
                0, 2**63 - 1, (), dtype=torch.int64, device=logits.device, generator=self.generator
            )
            tokens, logprobs = fused_draw(
                logits, temperatures, seed, min_p=self.config.min_p, row_max=row_max
            )
        else:
            entropies = self._entropy_fn(logits)
            self._check_logits(logits, entropies)
            noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
            noise.exponential_(generator=self.generator)
            tokens, temperatures, is_reasoning, logprobs, threshold = self._draw_fn(
                logits, entropies, noise, active, temperature_offsets
            )
        self.last_threshold = threshold
        return SamplerStep(
            tokens=tokens,
            temperatures=temperatures,
            entropies=entropies,
            is_reasoning=is_reasoning,
            logprobs=logprobs,
            threshold=threshold,
        )

    def _draw(
        self,
        logits: torch.Tensor,
        entropies: torch.Tensor,
        noise: torch.Tensor,
        active: torch.Tensor | None,
        temperature_offsets: torch.Tensor | None,
    ) -> tuple[torch.Tensor, ...]:
        """Steps 2-5 for (batch, vocab) logits, given their entropies and Exp(1) noise.

        Returns tokens, temperatures, is_reasoning, logprobs (each (batch,)) and the threshold.
        """
        cfg = self.config
        temperatures, is_reasoning, threshold = self._select_temperatures(
            entropies, active, temperature_offsets
        )
        scaled = logits.float() / temperatures[:, None]
        scaled = truncate(scaled, cfg.top_k, cfg.top_p, cfg.min_p)
        probs = torch.softmax(scaled, dim=-1)
        # argmax(p / E) with E ~ Exp(1) is a draw from p (the exponential race, no host
        # sync unlike torch.multinomial's checks); masked tokens have p = 0, never win.
        ratio = probs.div_(noise)
        tokens = torch.argmax(ratio, dim=-1, keepdim=True)
        # p[token] = (p / E)[token] * E[token]; avoids keeping a second (batch, vocab) buffer
        logprobs = torch.log(ratio.gather(1, tokens) * noise.gather(1, tokens)).squeeze(1)
        return tokens.squeeze(1), temperatures, is_reasoning, logprobs, threshold

    def _select_temperatures(
        self,
        entropies: torch.Tensor,
        active: torch.Tensor | None,
        temperature_offsets: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 2-3: (temperatures, is_reasoning, threshold) from the (batch,) entropies."""
        cfg = self.config
        threshold = self._threshold(entropies, active)
        is_reasoning = entropies >= threshold
        if cfg.mode == "multi":
            temperatures = torch.where(is_reasoning, self._high, self._low)
        else:
            temperatures = self._single.expand(entropies.shape[0])
        if temperature_offsets is not None:
            if cfg.mode == "multi" and cfg.offsets_apply_to == "reasoning":
                temperature_offsets = temperature_offsets.masked_fill(~is_reasoning, 0.0)
            temperatures = temperatures + temperature_offsets
        temperatures = temperatures.clamp(min=cfg.min_temperature)
        return temperatures, is_reasoning, threshold

    def _threshold(self, entropies: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
        mode = self.config.threshold_mode
        if mode == "fixed":
            return self._fixed
        if mode == "batch":
            return masked_quantile(entropies, self._q, active, self._fixed)
        # window: add this step's entropies first, then read the quantile (see module doc).
        self.window.add(entropies, active)
        return self.window.quantile(self._q, self._fixed)


# Left out of `compile()`: inductor failed to compile top-p's cumsum (its split scan) on an
# H100; eager, these few kernels still run inside the engine's CUDA graph.
@torch.compiler.disable
def truncate(scaled: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    """Top-k, then top-p, then min-p on tempered logits (masked entries become -inf).

    Each keeps at least the most likely token. Top-k and top-p are transformers' own warpers
    (the same sort/top-k kernels a hand-written version would run). Min-p is ours: in logit
    space, p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p), which skips the
    full-vocabulary softmax `MinPLogitsWarper` computes first.
    """
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    if top_k and top_k < scaled.shape[-1]:
        scaled = TopKLogitsWarper(top_k)(None, scaled)
    if top_p < 1.0:
        scaled = TopPLogitsWarper(top_p)(None, scaled)
    if min_p > 0.0:
        cutoff = scaled.amax(dim=-1, keepdim=True) + math.log(min_p)
        scaled = scaled.masked_fill(scaled < cutoff, float("-inf"))
    return scaled


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _invalid_message(x: torch.Tensor, bad: torch.Tensor) -> str:
    rows = torch.nonzero(bad).flatten().tolist()
    kinds = []
    if bool(torch.isnan(x[rows]).any()):
        kinds.append("NaN")
    if bool(torch.isposinf(x[rows]).any()):
        kinds.append("+inf")
    if not kinds:
        kinds.append("no finite logit")
    shown = rows[:8]
    more = "" if len(rows) <= 8 else f" (+{len(rows) - 8} more)"
    return (
        f"sampler: invalid logits ({', '.join(kinds)}) in rows {shown}{more} "
        f"of a ({x.shape[0]}, {x.shape[1]}) batch"
    )


class CUDAGraphSampler:
    """``MultiTemperatureSampler`` replayed from CUDA graphs (one per input signature).

    An eager sampler call launches a few dozen small kernels; inside HF ``generate``, which
    waits on the device every step, their host-side launch time adds to each step. This
    wrapper captures the call once per (batch, vocab, dtype, active?, offsets?) and then
    each call is three copies in, one graph replay and clones out. Same interface as the
    sampler (``step``, ``check_finite``, ``config``, ``window`` pass through); on CPU, or
    when the caller is itself capturing, it runs the sampler eagerly.

    A warm-up call before each capture runs on the real state; the window, its pointer and
    the NaN flag are restored afterwards, so captures leave no trace in the statistics.
    """

    def __init__(self, sampler: MultiTemperatureSampler):
        self.sampler = sampler
        self._graphs: dict[tuple, tuple] = {}

    def __getattr__(self, name):
        return getattr(self.sampler, name)

    @property
    def step(self) -> int:
        return self.sampler.step

    @step.setter
    def step(self, value: int) -> None:
        self.sampler.step = value

    def __call__(
        self,
        logits: torch.Tensor,
        active: torch.Tensor | None = None,
        temperature_offsets: torch.Tensor | None = None,
    ) -> SamplerStep:
        if logits.device.type != "cuda" or _capturing(logits.device):
            return self.sampler(logits, active, temperature_offsets)
        key = (
            tuple(logits.shape),
            logits.dtype,
            logits.device,
            active is not None,
            temperature_offsets is not None,
        )
        if key not in self._graphs:
            self._graphs[key] = self._capture(logits, active, temperature_offsets)
        graph, s_logits, s_active, s_offsets, s_out = self._graphs[key]
        s_logits.copy_(logits)
        if s_active is not None:
            s_active.copy_(active)
        if s_offsets is not None:
            s_offsets.copy_(temperature_offsets)
        graph.replay()
        out = SamplerStep(**{k: v.clone() for k, v in vars(s_out).items()})
        self.sampler.last_threshold = out.threshold
        return out

    def _capture(self, logits, active, offsets):
        s_logits = logits.clone()
        s_active = None if active is None else active.to(torch.bool).clone()
        s_offsets = None if offsets is None else offsets.to(logits.device, torch.float32).clone()
        sampler = self.sampler
        sampler._ensure_state(logits.device)
        window = sampler.window
        saved = [sampler._invalid.clone()]
        if window is not None:
            saved += [t.clone() for t in (window.buffer, window.ptr, window.count, window.sorted)]
        stream = torch.cuda.Stream(device=logits.device)
        stream.wait_stream(torch.cuda.current_stream(logits.device))
        with torch.cuda.stream(stream):
            sampler(s_logits, s_active, s_offsets)  # warm-up outside the capture
        torch.cuda.current_stream(logits.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            s_out = sampler(s_logits, s_active, s_offsets)
        # undo the warm-up call's effect on the statistics (capture itself runs nothing)
        sampler._invalid.copy_(saved[0])
        if window is not None:
            window.buffer.copy_(saved[1])
            window.ptr.copy_(saved[2])
            window.count.copy_(saved[3])
            window.sorted.copy_(saved[4])
        return graph, s_logits, s_active, s_offsets, s_out
