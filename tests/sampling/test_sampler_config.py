import pytest
from omegaconf import OmegaConf

from mtrl.sampling import MultiTemperatureConfig, ScheduleConfig


def test_defaults_follow_the_paper():
    c = MultiTemperatureConfig().validate()
    assert c.reasoning_fraction == 0.2
    assert c.window_size == 100_000
    assert c.threshold_mode == "window"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"low_temperature": -1.0}, "sampler.low_temperature: must be > 0, got -1.0"),
        ({"mode": "triple"}, "sampler.mode: must be one of single, multi, got 'triple'"),
        ({"threshold_mode": "median"}, "sampler.threshold_mode:"),
        ({"reasoning_fraction": 1.5}, "sampler.reasoning_fraction: must be in [0, 1]"),
        ({"window_size": 0}, "sampler.window_size: must be in [1, 100000000], got 0"),
        ({"top_p": 0.0}, "sampler.top_p:"),
        ({"top_k": -3}, "sampler.top_k:"),
        ({"min_p": 1.0}, "sampler.min_p:"),
        ({"nan_check": "sometimes"}, "sampler.nan_check:"),
        (
            {"high_temperature_schedule": ScheduleConfig(kind="linear", end=-1.0, steps=10)},
            "sampler.high_temperature_schedule.end: must be > 0, got -1.0",
        ),
        (
            {"high_temperature_schedule": ScheduleConfig(kind="linear", end=1.7)},
            "sampler.high_temperature_schedule.steps: must be > 0",
        ),
        (
            {"reasoning_fraction_schedule": ScheduleConfig(kind="warmup", start=0.0)},
            "sampler.reasoning_fraction_schedule.warmup_steps:",
        ),
        (
            {"low_temperature_schedule": ScheduleConfig(kind="exp")},
            "sampler.low_temperature_schedule.kind:",
        ),
        (
            {"temperature_schedule": ScheduleConfig(kind="step", milestones=[1], values=[1, 2])},
            "sampler.temperature_schedule.values:",
        ),
    ],
)
def test_validate_names_the_key(kwargs, message):
    with pytest.raises(ValueError) as err:
        MultiTemperatureConfig(**kwargs).validate()
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_structured_config_from_yaml():
    yaml = """
    sampler:
      mode: multi
      threshold_mode: batch
      high_temperature: 1.0
      high_temperature_schedule: {kind: linear, end: 1.7, steps: 400}
      reasoning_fraction_schedule: {kind: warmup, start: 0.0, warmup_steps: 50}
      temperature_schedule: {kind: step, milestones: [100, 200], values: [1.1, 1.2]}
      rollout_offsets: true
      top_p: 0.95
    """
    schema = OmegaConf.structured({"sampler": MultiTemperatureConfig})
    merged = OmegaConf.merge(schema, OmegaConf.create(yaml))
    cfg = OmegaConf.to_object(merged)["sampler"]
    assert isinstance(cfg, MultiTemperatureConfig)
    assert isinstance(cfg.high_temperature_schedule, ScheduleConfig)
    assert cfg.high_temperature_schedule.end == 1.7
    assert cfg.temperature_schedule.values == [1.1, 1.2]
    cfg.validate()
    assert cfg.offsets_for(4) == pytest.approx([0.0, 0.0, -0.1, 0.1])
    with pytest.raises(Exception, match="high_temperature"):
        OmegaConf.merge(schema, OmegaConf.create({"sampler": {"high_temperature": "hot"}}))


def test_offsets_for():
    assert MultiTemperatureConfig().offsets_for(3) == [0.0, 0.0, 0.0]
    c = MultiTemperatureConfig(rollout_offset_values=[0.0, 0.1])
    assert c.offsets_for(2) == [0.0, 0.1]
    with pytest.raises(ValueError, match="sampler.rollout_offset_values"):
        c.offsets_for(4)
