"""Configuration of the multi-temperature sampler (the ``sampler:`` section of an experiment).

Both dataclasses are plain structured configs for OmegaConf: every field is a str, int,
float, bool, an Optional of those, a list, or a nested dataclass. ``validate()`` raises a
``ValueError`` whose message starts with the dotted key path, e.g.
``sampler.low_temperature: must be > 0, got -1.0``.

A schedule is written relative to the base value it drives, so a YAML section reads::

    sampler:
      mode: multi
      high_temperature: 1.0
      high_temperature_schedule: {kind: linear, end: 1.7, steps: 400}   # 1.0 -> 1.7
      reasoning_fraction_schedule: {kind: warmup, start: 0.0, warmup_steps: 50}  # 0 -> 0.2
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MODES = ("single", "multi")
THRESHOLD_MODES = ("fixed", "window", "batch")
NAN_CHECKS = ("auto", "eager", "deferred", "off")
OFFSET_TARGETS = ("reasoning", "all")
SCHEDULE_KINDS = ("constant", "linear", "cosine", "step", "warmup")


@dataclass
class ScheduleConfig:
    """A value as a pure function of the optimizer step.

    ``start`` and ``end`` default to the base value the schedule belongs to (for example
    ``high_temperature``), so ``{kind: linear, end: 1.7, steps: 400}`` ramps from the base
    value to 1.7.

    kinds:
      constant  ``start`` at every step.
      linear    ``start`` until ``begin``, then a straight line to ``end`` over ``steps``
                steps, then ``end``.
      cosine    like linear, along a half cosine (flat at both ends).
      step      piecewise constant. With ``values``: ``start`` before ``milestones[0]``,
                ``values[i]`` from ``milestones[i]`` on. Without ``values``: multiplied by
                ``gamma`` at every milestone (or every ``step_size`` steps when
                ``milestones`` is empty), clamped to ``end`` when ``end`` is given.
      warmup    straight line from ``start`` to ``end`` over ``warmup_steps``, then
                constant ``end`` (warmup-then-constant).
    """

    kind: str = "constant"
    start: float | None = None
    end: float | None = None
    steps: int = 0
    begin: int = 0
    warmup_steps: int = 0
    milestones: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    step_size: int = 0
    gamma: float = 1.0

    def validate(self, prefix: str = "schedule") -> None:
        if self.kind not in SCHEDULE_KINDS:
            _fail(f"{prefix}.kind", f"must be one of {', '.join(SCHEDULE_KINDS)}", self.kind)
        for name in ("steps", "begin", "warmup_steps", "step_size"):
            if getattr(self, name) < 0:
                _fail(f"{prefix}.{name}", "must be >= 0", getattr(self, name))
        for name in ("start", "end", "gamma"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                _fail(f"{prefix}.{name}", "must be finite", value)
        if self.kind in ("linear", "cosine") and self.steps == 0 and self.end is not None:
            _fail(f"{prefix}.steps", f"must be > 0 for a {self.kind} schedule with an end", 0)
        if self.kind == "warmup" and self.warmup_steps == 0:
            _fail(f"{prefix}.warmup_steps", "must be > 0 for a warmup schedule", 0)
        if self.kind == "step":
            if sorted(self.milestones) != list(self.milestones) or any(
                m < 0 for m in self.milestones
            ):
                _fail(
                    f"{prefix}.milestones", "must be non-negative and increasing", self.milestones
                )
            if self.values and len(self.values) != len(self.milestones):
                _fail(
                    f"{prefix}.values",
                    f"needs one value per milestone ({len(self.milestones)})",
                    self.values,
                )
            if not self.values and not self.milestones and self.step_size == 0:
                _fail(f"{prefix}.milestones", "a step schedule needs milestones or step_size", [])
            if self.gamma <= 0:
                _fail(f"{prefix}.gamma", "must be > 0", self.gamma)


@dataclass
class MultiTemperatureConfig:
    """The ``sampler:`` section. Defaults follow arXiv:2510.08892 (p = 0.2, window 100k)."""

    # "single": one temperature for every token (the baseline); "multi": by entropy class.
    mode: str = "multi"
    # How the entropy threshold is found: "fixed" (entropy_threshold, nats), "window"
    # ((1-p) quantile of the last window_size generated-token entropies, the paper's way),
    # "batch" ((1-p) quantile of the current decoding step's rows).
    threshold_mode: str = "window"
    entropy_threshold: float = 1.0
    reasoning_fraction: float = 0.2
    window_size: int = 100_000
    high_temperature: float = 1.2
    low_temperature: float = 0.8
    temperature: float = 1.0  # used by mode=single
    high_temperature_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    low_temperature_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    temperature_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    reasoning_fraction_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # Rollout-level offsets inside a GRPO group, added to the temperatures of a rollout.
    # rollout_offsets: true gives 0, 0, -s, +s, -2s, +2s, ... with s = rollout_offset_step;
    # rollout_offset_values, when set, lists one offset per generation instead.
    rollout_offsets: bool = False
    rollout_offset_step: float = 0.1
    rollout_offset_values: list[float] | None = None
    # Which tokens the offsets move in mode=multi: "reasoning" (only the high-entropy tokens'
    # temperature, as the paper's code does: its rollout temperature enters only the reasoning
    # tokens' temperature) or "all". In mode=single every token has the one temperature and
    # the offset moves it, as in the paper's single-temperature runs.
    offsets_apply_to: str = "reasoning"
    # Truncation, applied after the per-token temperature (order: top_k, top_p, min_p).
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    # Temperatures (after offsets) are clamped to at least this value.
    min_temperature: float = 0.01
    # NaN/+inf logits: "auto" checks eagerly on CPU and deferred on CUDA (a device flag read
    # by check_finite(), no host sync per step); "eager" syncs every step; "off" never checks.
    nan_check: str = "auto"
    # For the metrics callback: log an entropy histogram every N optimizer steps (0 = never).
    entropy_histogram_every: int = 100

    def validate(self, prefix: str = "sampler") -> MultiTemperatureConfig:
        """Check every field; raise ValueError('<prefix>.<key>: <why>, got <value>')."""
        if self.mode not in MODES:
            _fail(f"{prefix}.mode", f"must be one of {', '.join(MODES)}", self.mode)
        if self.threshold_mode not in THRESHOLD_MODES:
            _fail(
                f"{prefix}.threshold_mode",
                f"must be one of {', '.join(THRESHOLD_MODES)}",
                self.threshold_mode,
            )
        if self.offsets_apply_to not in OFFSET_TARGETS:
            _fail(
                f"{prefix}.offsets_apply_to",
                f"must be one of {', '.join(OFFSET_TARGETS)}",
                self.offsets_apply_to,
            )
        if self.nan_check not in NAN_CHECKS:
            _fail(f"{prefix}.nan_check", f"must be one of {', '.join(NAN_CHECKS)}", self.nan_check)
        if not (math.isfinite(self.entropy_threshold) and self.entropy_threshold >= 0):
            _fail(
                f"{prefix}.entropy_threshold", "must be a finite value >= 0", self.entropy_threshold
            )
        if not 0.0 <= self.reasoning_fraction <= 1.0:
            _fail(f"{prefix}.reasoning_fraction", "must be in [0, 1]", self.reasoning_fraction)
        # The window is a GPU ring buffer of fp32 entropies: 10^8 is 400 MB (the paper's 10^5).
        if not 1 <= self.window_size <= 10**8:
            _fail(f"{prefix}.window_size", "must be in [1, 100000000]", self.window_size)
        for name in ("high_temperature", "low_temperature", "temperature", "min_temperature"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                _fail(f"{prefix}.{name}", "must be > 0", value)
        if self.top_k < 0:
            _fail(f"{prefix}.top_k", "must be >= 0 (0 = off)", self.top_k)
        if not 0.0 < self.top_p <= 1.0:
            _fail(f"{prefix}.top_p", "must be in (0, 1]", self.top_p)
        if not 0.0 <= self.min_p < 1.0:
            _fail(f"{prefix}.min_p", "must be in [0, 1)", self.min_p)
        if self.entropy_histogram_every < 0:
            _fail(f"{prefix}.entropy_histogram_every", "must be >= 0", self.entropy_histogram_every)
        if not math.isfinite(self.rollout_offset_step):
            _fail(f"{prefix}.rollout_offset_step", "must be finite", self.rollout_offset_step)
        if self.rollout_offset_values is not None and not all(
            math.isfinite(v) for v in self.rollout_offset_values
        ):
            _fail(f"{prefix}.rollout_offset_values", "must be finite", self.rollout_offset_values)
        # Schedules: structure, then the values they reach at their ends.
        bases = {
            "high_temperature": self.high_temperature,
            "low_temperature": self.low_temperature,
            "temperature": self.temperature,
            "reasoning_fraction": self.reasoning_fraction,
        }
        for name, base in bases.items():
            sched: ScheduleConfig = getattr(self, f"{name}_schedule")
            key = f"{prefix}.{name}_schedule"
            sched.validate(key)
            reached = {"start": base if sched.start is None else sched.start}
            reached["end"] = base if sched.end is None else sched.end
            for i, v in enumerate(sched.values):
                reached[f"values[{i}]"] = v
            for which, v in reached.items():
                if name == "reasoning_fraction" and not 0.0 <= v <= 1.0:
                    _fail(f"{key}.{which.split('[')[0]}", "must be in [0, 1]", v)
                if name != "reasoning_fraction" and not v > 0:
                    _fail(f"{key}.{which.split('[')[0]}", "must be > 0", v)
        return self

    def offsets_for(self, num_generations: int) -> list[float]:
        """Per-generation temperature offsets for a GRPO group of ``num_generations``."""
        from mtrl.sampling.schedules import rollout_offsets

        if self.rollout_offset_values is not None:
            if len(self.rollout_offset_values) != num_generations:
                _fail(
                    "sampler.rollout_offset_values",
                    f"needs one offset per generation ({num_generations})",
                    self.rollout_offset_values,
                )
            return [float(v) for v in self.rollout_offset_values]
        if not self.rollout_offsets:
            return [0.0] * num_generations
        return rollout_offsets(num_generations, self.rollout_offset_step)


def _fail(key: str, why: str, value: object) -> None:
    raise ValueError(f"{key}: {why}, got {value!r}")
