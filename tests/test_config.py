"""Experiment configs: composition, overrides, and one-line errors with exit status 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from mtrl.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "launch" / "train.py"
SMOKE = ROOT / "experiments" / "smoke.yaml"


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_smoke_config_resolves_with_base_and_overrides():
    cfg = load_config(SMOKE, ["sampler.high_temperature=1.5", "train.max_steps=7"])
    assert cfg.name == "smoke"
    assert cfg.model.name == "tiny"
    assert cfg.sampler.high_temperature == 1.5
    assert cfg.train.max_steps == 7
    assert cfg.train.loss_type == "dapo"  # from base.yaml
    assert dict(cfg.rewards) == {"accuracy": 1.0, "format": 0.1}


def test_every_experiment_file_validates():
    files = [
        p
        for p in (ROOT / "experiments").rglob("*.yaml")
        if p.name != "base.yaml"  # a base alone names no model
    ]
    assert len(files) >= 10
    for path in files:
        load_config(path)


def test_base_chain_and_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, "model: {name: tiny}\ndata: {source: gsm8k}\n", "root.yaml")
    write(tmp_path / "sub", "base: ../root.yaml\nsampler: {mode: single}\n", "mid.yaml")
    leaf = write(tmp_path, "base: sub/mid.yaml\nsampler: {temperature: 0.7}\n", "leaf.yaml")
    cfg = load_config(leaf)
    assert (cfg.model.name, cfg.sampler.mode, cfg.sampler.temperature) == ("tiny", "single", 0.7)
    assert cfg.name == "leaf"


# (file text or None for smoke.yaml, overrides, expected one-line message fragment)
MALFORMED = [
    (
        None,
        ["sampler.hihg_temperature=1.3"],
        "sampler.hihg_temperature: unknown key (did you mean 'high_temperature'?)",
    ),
    (None, ["sampler.high_temperature=hot"], "sampler.high_temperature:"),
    (None, ["sampler.low_temperature=-1"], "sampler.low_temperature: must be > 0"),
    (None, ["sampler.reasoning_fraction=1.5"], "sampler.reasoning_fraction: must be in [0, 1]"),
    (None, ["sampler.mode=triple"], "sampler.mode: must be one of single, multi"),
    (
        None,
        ["train.learnig_rate=0.1"],
        "train.learnig_rate: unknown key (did you mean 'learning_rate'?)",
    ),
    (None, ["train.max_steps=ten"], "train.max_steps: expected int, got 'ten'"),
    (None, ["train.temperature=0.7"], "train.temperature: set sampler.temperature"),
    (None, ["rewards.acuracy=1.0"], "rewards.acuracy: unknown reward (did you mean 'accuracy'?)"),
    (None, ["model.dtype=float64"], "model.dtype: must be one of auto, float32, bfloat16, float16"),
    (None, ["pbs.threshold=2"], "pbs.threshold: must be in [0.0, 1.0]"),
    (None, ["pbs.segment_size=200"], "pbs.segment_size: must be a multiple of pbs.block_size"),
    (None, ["data.on_bad_row=ignore"], "data.on_bad_row: must be one of error, skip"),
    (None, ["model.lora.r=0"], "model.lora.r: must be > 0"),
    (None, ["tracking.urii=x"], "tracking.urii: unknown key (did you mean 'uri'?)"),
    (None, ["modle.name=x"], "modle: unknown key (did you mean 'model'?)"),
    (None, ["max_steps"], "override 'max_steps': expected section.key=value"),
    ("data: {source: gsm8k}\n", [], "model.name: missing required value"),
    ("model: {name: tiny}\n", [], "data.source: missing required value"),
    ("model: {name: tiny}\ndata: {source: gsm8k}\nsampler: [1, 2]\n", [], "sampler:"),
    ("model: {name: tiny\n", [], "not valid YAML"),
    ("base: missing.yaml\n", [], "config file not found"),
    (
        "model: {name: tiny}\ndata: {source: reasoning_gym}\n",
        [],
        "data.task: missing required value",
    ),
    (
        "model: {name: tiny}\ndata: {source: gsm8k}\ntrain: {num_generations: 3, per_device_train_batch_size: 4}\n",
        [],
        "train:",
    ),
]


@pytest.mark.parametrize("text,overrides,expected", MALFORMED)
def test_malformed_config_raises_one_line(tmp_path, text, overrides, expected):
    path = SMOKE if text is None else write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["sampler.hihg_temperature=1.3"], "error: sampler.hihg_temperature: unknown key"),
        (["train.max_steps=ten"], "error: train.max_steps: expected int"),
    ],
)
def test_cli_exits_2_with_one_line_and_no_traceback(overrides, expected):
    result = subprocess.run(
        [sys.executable, str(TRAIN), str(SMOKE), *overrides],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(expected)
    assert "Traceback" not in result.stderr
    assert all(not line.startswith(("  File", "Traceback")) for line in lines)


def test_print_config_shows_resolved_values():
    result = subprocess.run(
        [sys.executable, str(TRAIN), str(SMOKE), "--print-config", "sampler.low_temperature=0.6"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "low_temperature: 0.6" in result.stdout
    assert "name: tiny" in result.stdout
