import math

import pytest

from mtrl.sampling import ScheduleConfig, rollout_offsets, schedule_value
from mtrl.sampling.schedules import constant, cosine, linear, step_schedule, warmup


def test_constant():
    assert constant(0, 1.3) == 1.3
    assert constant(10_000, 1.3) == 1.3
    assert schedule_value(ScheduleConfig(), 0.7, 0) == 0.7
    assert schedule_value(ScheduleConfig(), 0.7, 500) == 0.7
    assert schedule_value(ScheduleConfig(start=0.9), 0.7, 500) == 0.9


def test_linear_endpoints_and_midpoint():
    assert linear(0, 1.0, 1.7, 400) == pytest.approx(1.0)
    assert linear(200, 1.0, 1.7, 400) == pytest.approx(1.35)
    assert linear(400, 1.0, 1.7, 400) == pytest.approx(1.7)
    assert linear(1000, 1.0, 1.7, 400) == pytest.approx(1.7)
    # with a delay
    assert linear(50, 1.0, 2.0, 100, begin=100) == pytest.approx(1.0)
    assert linear(150, 1.0, 2.0, 100, begin=100) == pytest.approx(1.5)
    assert linear(200, 1.0, 2.0, 100, begin=100) == pytest.approx(2.0)
    # YAML form: {kind: linear, end: 1.7, steps: 400} starts at the base value
    sched = ScheduleConfig(kind="linear", end=1.7, steps=400)
    assert schedule_value(sched, 1.0, 0) == pytest.approx(1.0)
    assert schedule_value(sched, 1.0, 200) == pytest.approx(1.35)
    assert schedule_value(sched, 1.0, 400) == pytest.approx(1.7)


def test_cosine_endpoints_and_midpoint():
    assert cosine(0, 1.0, 2.0, 100) == pytest.approx(1.0)
    assert cosine(50, 1.0, 2.0, 100) == pytest.approx(1.5)
    assert cosine(25, 1.0, 2.0, 100) == pytest.approx(1.0 + (1 - math.cos(math.pi / 4)) / 2)
    assert cosine(100, 1.0, 2.0, 100) == pytest.approx(2.0)
    assert cosine(300, 1.0, 2.0, 100) == pytest.approx(2.0)
    sched = ScheduleConfig(kind="cosine", start=1.2, end=0.8, steps=10, begin=10)
    assert schedule_value(sched, 9.9, 0) == pytest.approx(1.2)
    assert schedule_value(sched, 9.9, 15) == pytest.approx(1.0)
    assert schedule_value(sched, 9.9, 20) == pytest.approx(0.8)


def test_step_with_values():
    f = lambda s: step_schedule(s, 1.0, milestones=[100, 200], values=[1.2, 1.4])  # noqa: E731
    assert f(0) == 1.0
    assert f(99) == 1.0
    assert f(100) == 1.2
    assert f(150) == 1.2
    assert f(200) == 1.4
    assert f(10_000) == 1.4


def test_step_with_gamma():
    assert step_schedule(0, 1.0, step_size=50, gamma=1.1) == pytest.approx(1.0)
    assert step_schedule(49, 1.0, step_size=50, gamma=1.1) == pytest.approx(1.0)
    assert step_schedule(50, 1.0, step_size=50, gamma=1.1) == pytest.approx(1.1)
    assert step_schedule(125, 1.0, step_size=50, gamma=1.1) == pytest.approx(1.21)
    # clamped at end
    assert step_schedule(10_000, 1.0, step_size=50, gamma=1.1, end=1.7) == pytest.approx(1.7)
    # milestones with gamma (MultiStepLR semantics), decreasing with a floor
    sched = ScheduleConfig(kind="step", milestones=[10, 20], gamma=0.5, end=0.3)
    assert schedule_value(sched, 1.0, 5) == pytest.approx(1.0)
    assert schedule_value(sched, 1.0, 10) == pytest.approx(0.5)
    assert schedule_value(sched, 1.0, 25) == pytest.approx(0.3)


def test_warmup_then_constant():
    assert warmup(0, 0.0, 0.2, 50) == pytest.approx(0.0)
    assert warmup(25, 0.0, 0.2, 50) == pytest.approx(0.1)
    assert warmup(50, 0.0, 0.2, 50) == pytest.approx(0.2)
    assert warmup(5000, 0.0, 0.2, 50) == pytest.approx(0.2)
    sched = ScheduleConfig(kind="warmup", start=0.0, warmup_steps=50)  # ends at the base
    assert schedule_value(sched, 0.2, 0) == pytest.approx(0.0)
    assert schedule_value(sched, 0.2, 25) == pytest.approx(0.1)
    assert schedule_value(sched, 0.2, 50) == pytest.approx(0.2)


def test_rollout_offsets():
    assert rollout_offsets(0) == []
    assert rollout_offsets(1) == [0.0]
    assert rollout_offsets(2) == [0.0, 0.0]
    assert rollout_offsets(3) == [0.0, 0.0, -0.1]
    assert rollout_offsets(8) == pytest.approx([0, 0, -0.1, 0.1, -0.2, 0.2, -0.3, 0.3])
    assert rollout_offsets(5, step=0.05) == pytest.approx([0, 0, -0.05, 0.05, -0.1])
