"""Experiment configs: composition, overrides, and one-line errors with exit status 2."""

import dataclasses
import importlib.util
import shutil
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
    (None, ["pbs.threshold=2"], "pbs.threshold: must be in (0, 1], got 2"),
    (None, ["pbs.segment_size=200"], "pbs.segment_size: must be a multiple of block_size"),
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


# ---------------------------------------------------------------------------------------------
# Every bad config stops launch/train.py with exit status 2 and one line naming the key path,
# before any model, tokenizer or dataset is touched (the loaders below fail if called).

BAD = [
    ([], "train.num_generations=0", "train.num_generations: must be > 0"),
    ("base: 5\nmodel: {name: tiny}\ndata: {source: gsm8k}\n", None, "base: expected a file name"),
    (
        "model: {name: tiny}\ndata: {source: gsm8k}\ntrain: [1, 2]\n",
        None,
        "train: expected a mapping",
    ),
    ([], "train.seed=${train.seed}", "train.seed: Recursive interpolation"),
    ([], "train.output_dir=${oc.env:MTRL_UNSET_FOR_TEST}", "train.output_dir: "),
    ([], "train.per_device_train_batch_size=0", "train.per_device_train_batch_size: must be > 0"),
    ([], "train.learning_rate=-1", "train.learning_rate: must be >= 0, got -1"),
    ([], "train.max_completion_length=-1", "train.max_completion_length: must be >= 0"),
    ([], "train.max_steps=-2", "train.max_steps: must be >= 0 or -1, got -2"),
    ([], "train.max_grad_norm=.inf", "train.max_grad_norm: must be a finite number, got inf"),
    ([], "tracking.uri=not-a-uri", "tracking.uri: 'not-a-uri' is not an MLflow tracking URI"),
    (
        [],
        "rollout.importance_sampling_cap=nan",
        "rollout.importance_sampling_cap: must be a finite",
    ),
    (
        [],
        "rollout.importance_sampling_cap=0.5",
        "rollout.importance_sampling_cap: must be a finite",
    ),
    ([], "rollout.engine=fats", "rollout.engine: must be one of auto, fast, hf; got 'fats'"),
    ([], "rollout.check_every=0", "rollout.check_every: must be >= 1"),
    ([], "rollout.compile_prefill=maybe", "rollout.compile_prefill: Value 'maybe' is not a valid"),
    ([], "rollout.max_autotune=maybe", "rollout.max_autotune: Value 'maybe' is not a valid bool"),
    ([], "rollout.enigne=hf", "rollout.enigne: unknown key (did you mean 'engine'?)"),
    ([], "sampler.window_size=1000000000000", "sampler.window_size: must be in [1, 100000000]"),
    ([], "sampler.high_temperature=inf", "sampler.high_temperature: must be a finite number"),
    ("base: smoke.yaml\nsampler: [1, 2]\n", None, "sampler: expected a mapping"),
    (
        "base: smoke.yaml\neval: {benchmarks: [{source: gsm8k}, {source: aime2025, bogus: 1}]}\n",
        None,
        "eval.benchmarks[1].bogus: unknown key",
    ),
    (
        "base: smoke.yaml\neval: {benchmarks: [{source: gsm8k, promt_format: text}]}\n",
        None,
        "eval.benchmarks[0].promt_format: unknown key (did you mean 'prompt_format'?)",
    ),
    ([], "eval.benchmarks=[{source: gsm8k, max_samples: 0}]", "eval.benchmarks[0].max_samples"),
    ([], "eval.benchmarks=[{source: gsm8k, prompt_format: xml}]", "eval.benchmarks[0].prompt_"),
    ([], "eval.temperature=inf", "eval.temperature: must be a finite number"),
    ([], "eval.top_p=0", "eval.top_p: must be in (0.0, 1.0], got 0"),
    ([], "pbs.threshold=0", "pbs.threshold: must be in (0, 1], got 0"),
    ([], "pbs.block_size=100", "pbs.block_size: must be a power of two"),
    ([], "pbs.treshold=0.5", "pbs.treshold: unknown key (did you mean 'threshold'?)"),
    ([], "pbs.backend=cuda", "pbs.backend: must be one of"),
    ([], "pbs.min_seq_len=many", "pbs.min_seq_len: expected int, got 'many'"),
    ("base: smoke.yaml\npbs: [1]\n", None, "pbs: expected a mapping"),
    ([], "scoring.timeout_s=0", "scoring.timeout_s: must be > 0"),
    ([], "scoring.workers=0", "scoring.workers: must be >= 1"),
    ([], "scoring.memory_mb=lots", "scoring.memory_mb: Value 'lots'"),
    ([], "scoring.timeout=3", "scoring.timeout: unknown key (did you mean 'timeout_s'?)"),
    ([], "model.dtype=float64", "model.dtype: must be one of auto, float32, bfloat16, float16"),
    ([], "model.tiny.architecture=gpt2", "model.tiny.architecture: must be one of qwen2, llama"),
    ([], "model.tiny.hidden_size=-64", "model.tiny.hidden_size: must be > 0, got -64"),
    ([], "model.lora.dropout=1.5", "model.lora.dropout: must be in [0.0, 1.0], got 1.5"),
    ([], "data.max_prompt_tokens=0", "data.max_prompt_tokens: must be > 0, got 0"),
    ([], "data.on_bad_row=ignore", "data.on_bad_row: must be one of error, skip; got 'ignore'"),
    ([], "data.size=-1", "data.size: must be > 0, got -1"),
]


def _refuse(*args, **kwargs):
    raise AssertionError("a loader ran before the config was validated")


@pytest.fixture
def loaders_refuse(monkeypatch):
    import datasets
    import transformers

    import mtrl.data
    import mtrl.models

    for name in ["load_model_and_tokenizer", "load_model", "load_tokenizer", "build_tiny"]:
        monkeypatch.setattr(mtrl.models, name, _refuse)
    for name in ["load_prompts", "load_prompts_with_stats"]:
        monkeypatch.setattr(mtrl.data, name, _refuse)
    for auto in [transformers.AutoModelForCausalLM, transformers.AutoTokenizer]:
        monkeypatch.setattr(auto, "from_pretrained", _refuse)
    monkeypatch.setattr(datasets, "load_dataset", _refuse)
    monkeypatch.delenv("MTRL_UNSET_FOR_TEST", raising=False)


def _launcher(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("text,override,expected", BAD)
def test_bad_config_exits_2_with_one_line_before_any_loading(
    tmp_path, capsys, loaders_refuse, text, override, expected
):
    if isinstance(text, str):
        shutil.copy(SMOKE, tmp_path / "smoke.yaml")
        shutil.copy(ROOT / "experiments" / "base.yaml", tmp_path / "base.yaml")
    path = write(tmp_path, text) if isinstance(text, str) else SMOKE
    argv = [str(path), f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    argv += [override] if override else []
    with pytest.raises(SystemExit) as info:
        _launcher("train").main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert info.value.code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {expected}"), lines[0]


def test_eval_launcher_checks_the_config_before_loading(tmp_path, capsys, loaders_refuse):
    path = write(tmp_path, "base: " + str(SMOKE) + "\n")
    with pytest.raises(SystemExit) as info:
        _launcher("eval").main([str(path), "eval.benchmarks=[{source: gsm8k, max_samples: -3}]"])
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: eval.benchmarks[0].max_samples: must be > 0, got -3\n"


def test_loaded_config_is_resolved_complete_and_loggable(monkeypatch):
    from mtrl.config import DType, flatten
    from pbs import PBSConfig

    monkeypatch.setenv("MTRL_SEED_FOR_TEST", "7")
    cfg = load_config(
        SMOKE,
        [
            "train.seed=${oc.decode:${oc.env:MTRL_SEED_FOR_TEST}}",
            "train.max_steps=-1",  # TRL's own sentinel (train by epochs) stays allowed
            "model.dtype=bfloat16",
            "pbs.threshold=0.5",
        ],
    )
    assert cfg.train.seed == 7 and cfg.train.max_steps == -1
    assert cfg.model.dtype == DType.bfloat16 == "bfloat16"
    # pbs holds every PBSConfig field: the file's values, PBSConfig's defaults elsewhere.
    assert dict(cfg.pbs) == {**dataclasses.asdict(PBSConfig()), "threshold": 0.5}
    flat = flatten(cfg)
    assert flat["model.dtype"] == "bfloat16" and type(flat["model.dtype"]) is str
    assert flat["pbs.block_size"] == 128 and flat["data.max_prompt_tokens"] == 4096
    assert flat["scoring.timeout_s"] == 5.0 and flat["rollout.engine"] == "auto"


def test_rollout_config_lives_beside_the_engine():
    from mtrl.config import RolloutConfig as FromConfig
    from mtrl.rollout import RolloutConfig

    assert FromConfig is RolloutConfig
    assert RolloutConfig().validate() == RolloutConfig()
    with pytest.raises(ValueError, match=r"^rollout.check_every: must be >= 1, got 0$"):
        RolloutConfig(check_every=0).validate()
    with pytest.raises(ValueError, match=r"^rollout.max_autotune: .* needs rollout.compile_decode"):
        RolloutConfig(max_autotune=True, compile_decode=False).validate()
    with pytest.raises(ValueError, match="^rollout.engine: must be one of auto, fast, hf"):
        RolloutConfig(engine="vllm").validate()


def test_rollout_engine_options_compile_only_on_cuda():
    """The trainer and the evaluator build their engine from the same options: the section's,
    with the compiled decode and prefill only for a policy on CUDA."""
    import torch

    from mtrl.rollout import RolloutConfig

    cfg = RolloutConfig(check_every=8, compile_decode=True, compile_prefill=True, max_autotune=True)
    want = dict(check_every=8, fused_norms=False, max_autotune=True)
    assert cfg.engine_options(torch.device("cuda", 0)) == {
        **want,
        "compile_decode": True,
        "compile_prefill": True,
    }
    assert cfg.engine_options(torch.device("cpu")) == {
        **want,
        "compile_decode": False,
        "compile_prefill": False,
    }


def test_database_tracking_uri_without_sqlalchemy_names_mlflow_skinny(monkeypatch):
    """mlflow-skinny (what a GPU image often has) has no SQLAlchemy: a sqlite URI gets a line
    that says so and what to use instead, not "is not an MLflow tracking URI"."""
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # import sqlalchemy fails, as there
    with pytest.raises(ConfigError) as info:
        load_config(SMOKE, ["tracking.uri=sqlite:///mlflow.db"])
    assert str(info.value).startswith(
        "tracking.uri: 'sqlite:///mlflow.db' is a database store, which needs the full mlflow"
    )
    assert "\n" not in str(info.value) and "MLFLOW_ALLOW_FILE_STORE=true" in str(info.value)
    load_config(SMOKE, ["tracking.uri=http://127.0.0.1:5000"])  # a server needs no SQLAlchemy
