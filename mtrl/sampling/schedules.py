"""Schedules: values as pure functions of the optimizer step (not of dataloader batches).

Each function takes the step first and returns a Python float; ``schedule_value`` applies a
``ScheduleConfig`` to the base value it belongs to. ``rollout_offsets`` gives the paper's
rollout-level temperature offsets inside a GRPO group.
"""

from __future__ import annotations

import bisect
import math

from mtrl.sampling.config import ScheduleConfig


def constant(step: int, value: float) -> float:
    return float(value)


def _progress(step: int, begin: int, steps: int) -> float:
    if steps <= 0:
        return 1.0 if step >= begin else 0.0
    return min(max((step - begin) / steps, 0.0), 1.0)


def linear(step: int, start: float, end: float, steps: int, begin: int = 0) -> float:
    """``start`` until ``begin``, a straight line to ``end`` at ``begin + steps``, then ``end``."""
    t = _progress(step, begin, steps)
    return float(start + (end - start) * t)


def cosine(step: int, start: float, end: float, steps: int, begin: int = 0) -> float:
    """Half-cosine from ``start`` (at ``begin``) to ``end`` (at ``begin + steps``)."""
    t = _progress(step, begin, steps)
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t)))


def step_schedule(
    step: int,
    start: float,
    milestones: list[int] | tuple[int, ...] = (),
    values: list[float] | tuple[float, ...] = (),
    step_size: int = 0,
    gamma: float = 1.0,
    end: float | None = None,
) -> float:
    """Piecewise constant.

    With ``values``: ``start`` before ``milestones[0]``, ``values[i]`` from ``milestones[i]``.
    Otherwise ``start * gamma**k`` with k the number of milestones reached (or
    ``step // step_size`` without milestones), clamped towards ``end`` when given.
    """
    if values:
        k = bisect.bisect_right(list(milestones), step)
        return float(start if k == 0 else values[k - 1])
    if milestones:
        k = bisect.bisect_right(list(milestones), step)
    elif step_size > 0:
        k = max(step, 0) // step_size
    else:
        k = 0
    value = start * gamma**k
    if end is not None:
        value = min(value, end) if end >= start else max(value, end)
    return float(value)


def warmup(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Warmup-then-constant: a straight line from ``start`` to ``end`` over ``warmup_steps``."""
    return linear(step, start, end, warmup_steps, 0)


def schedule_value(schedule: ScheduleConfig, base: float, step: int) -> float:
    """The value of ``schedule`` at optimizer ``step``; ``start``/``end`` default to ``base``."""
    start = base if schedule.start is None else schedule.start
    end = base if schedule.end is None else schedule.end
    kind = schedule.kind
    if kind == "constant":
        return constant(step, start)
    if kind == "linear":
        return linear(step, start, end, schedule.steps, schedule.begin)
    if kind == "cosine":
        return cosine(step, start, end, schedule.steps, schedule.begin)
    if kind == "step":
        return step_schedule(
            step,
            start,
            schedule.milestones,
            schedule.values,
            schedule.step_size,
            schedule.gamma,
            schedule.end,
        )
    if kind == "warmup":
        return warmup(step, start, end, schedule.warmup_steps)
    raise ValueError(f"schedule.kind: unknown kind, got {kind!r}")


def rollout_offsets(num_generations: int, step: float = 0.1) -> list[float]:
    """Offsets 0, 0, -s, +s, -2s, +2s, ... for the rollouts of one GRPO group (arXiv:2510.08892).

    Rollout i of a group samples every token at its class temperature plus offsets[i].
    """
    if num_generations < 0:
        raise ValueError(f"num_generations: must be >= 0, got {num_generations}")
    out = [0.0, 0.0][:num_generations]
    k = 1
    while len(out) < num_generations:
        out.append(-k * step)
        if len(out) < num_generations:
            out.append(k * step)
        k += 1
    return [round(v, 12) for v in out]
