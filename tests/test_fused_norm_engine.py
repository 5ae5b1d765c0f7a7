"""RolloutEngine(fused_norms=True): the same greedy tokens as the plain decode on the repo's tiny
models and a random Qwen2 of awkward sizes, with the fused kernels really running (CPU through
Triton's interpreter); the model's own forward untouched outside the engine; models that don't
match keep their layers; the `rollout.fused_norms` key; GPU: graphs and compile."""

import ast
import inspect
import logging
import textwrap

import pytest
import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from mtrl.config import TinyModelConfig
from mtrl.models import build_tiny_model, build_tiny_tokenizer
from mtrl.rollout import RolloutEngine, fuse_projections
from mtrl.rollout import fused_norm as fn
from mtrl.rollout.fused_norm import FusedNorms
from mtrl.sampling import MultiTemperatureConfig, MultiTemperatureSampler

PAD = 1
NO_EOS = 2  # never made likely: rows run the full length


def sharpen(model, factor=40.0):
    """A sharper LM head (greedy has no near-ties that rounding could flip) and norm weights
    that differ from norm to norm (a fused layer using the wrong one changes the tokens)."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


def repo_tiny(architecture: str):
    """The repo's tiny model (`model.name: tiny`), untied head so sharpening leaves the input."""
    model = build_tiny_model(TinyModelConfig(architecture=architecture), build_tiny_tokenizer())
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    return sharpen(model)


def awkward_qwen2(dtype=torch.float32, **kw):
    """A random Qwen2 whose hidden and intermediate sizes are not powers of two."""
    torch.manual_seed(0)
    sizes = dict(
        vocab_size=160,
        hidden_size=48,
        intermediate_size=104,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    config = Qwen2Config(
        **(sizes | kw),
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        eos_token_id=NO_EOS,
        attn_implementation="sdpa",
    )
    return sharpen(Qwen2ForCausalLM(config)).to(dtype)


def prompts(vocab, lengths=(9, 5, 2, 7), seed=1, device="cpu"):
    """Left-padded random prompts (B, max(lengths))."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, width - n :] = 1
    return ids.to(device), mask.to(device)


def greedy(model, fused_norms, ids, mask, n=12, **kw):
    sampler = MultiTemperatureSampler(MultiTemperatureConfig(top_k=1, threshold_mode="fixed"))
    engine = RolloutEngine(model, sampler, NO_EOS, PAD, n, fused_norms=fused_norms, **kw)
    return engine, engine.generate(ids, mask)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts of the fused kernels the decoder layers call, by name."""
    calls = {"add_rms_norm": 0, "rms_norm": 0, "silu_mul": 0}
    for name in calls:
        real = getattr(fn, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(fn, name, counted)
    return calls


def no_instance_forwards(model) -> bool:
    return not any("forward" in m.__dict__ for m in model.modules())


# --------------------------------------------------------------------------- greedy equality
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: repo_tiny("llama"), id="tiny-llama"),
        pytest.param(lambda: repo_tiny("qwen2"), id="tiny-qwen2"),
        pytest.param(awkward_qwen2, id="qwen2-48x104"),
        pytest.param(lambda: awkward_qwen2(torch.float16), id="qwen2-48x104-fp16"),
    ],
)
@pytest.mark.parametrize("fused_projections", [True, False])
def test_greedy_tokens_equal_with_fused_norms(make, fused_projections, kernel_calls):
    model = make()
    if fused_projections:
        fuse_projections(model)  # gate/up as views of one GEMM output, read in place
    ids, mask = prompts(model.config.vocab_size)
    n = 12
    _, plain = greedy(model, False, ids, mask, n)
    assert kernel_calls == {"add_rms_norm": 0, "rms_norm": 0, "silu_mul": 0}
    engine, fused = greedy(model, True, ids, mask, n)
    layers = model.config.num_hidden_layers
    assert len(engine._norms) == layers
    # Every decode step (n - 1 of them, the first token comes from the prefill) ran each
    # layer's two add+norms and its SiLU-mul; the first layer's input norm is the only plain one.
    steps = n - 1
    expected = {"add_rms_norm": 2 * layers * steps, "rms_norm": steps, "silu_mul": layers * steps}
    assert kernel_calls == expected
    assert torch.equal(fused.completion_ids, plain.completion_ids)
    assert fused.completion_ids.shape[1] == n
    torch.testing.assert_close(fused.entropies, plain.entropies, atol=2e-2, rtol=2e-2)
    assert no_instance_forwards(model)


def test_lora_model_decodes_the_same_with_fused_norms(kernel_calls):
    """A PeftModel with LoRA on attention and MLP projections (unmerged): the fused layers call
    the adapted projections, the tokens equal the plain decode."""
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"])
    model = peft.get_peft_model(awkward_qwen2(), config).eval()
    with torch.no_grad():  # nonzero adapters, so that skipping one would change the tokens
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids, mask = prompts(160, seed=2)
    _, plain = greedy(model, False, ids, mask, 10)
    engine, fused = greedy(model, True, ids, mask, 10)
    assert len(engine._norms) == 3 and kernel_calls["silu_mul"] == 3 * 9
    assert torch.equal(fused.completion_ids, plain.completion_ids)


# --------------------------------------------------------------------------- model untouched
def test_model_forward_unchanged_outside_the_engine():
    """After (and around) an engine call the model's forward is its own: the same logits and
    gradients, no instance forwards left; a failing decode removes them too."""
    model = awkward_qwen2()
    fuse_projections(model)
    ids, mask = prompts(model.config.vocab_size, seed=3)

    def train_forward():
        model.train()
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.eval()
        return out.logits.detach(), grads

    logits, grads = train_forward()
    engine, _ = greedy(model, True, ids, mask, 6)
    assert len(engine._norms) == 3 and no_instance_forwards(model)
    after_logits, after_grads = train_forward()
    assert torch.equal(after_logits, logits)
    assert all(torch.equal(a, b) for a, b in zip(after_grads, grads, strict=True))

    with pytest.raises(RuntimeError, match="boom"), engine._norms:
        assert not no_instance_forwards(model)
        raise RuntimeError("boom")
    assert no_instance_forwards(model)


def test_installed_forward_matches_the_model_and_guards_the_handoff():
    """The fused layers over a whole sequence equal the model's own forward; a hook that
    changes a layer's output between layers breaks the hand-off, and the next layer notices."""
    model = awkward_qwen2()
    ids, mask = prompts(model.config.vocab_size, seed=4)
    norms = FusedNorms(model)

    def logits():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits

    plain = logits()
    with norms:
        torch.testing.assert_close(logits(), plain, atol=1e-4, rtol=1e-4)
    hook = model.model.layers[1].register_forward_hook(lambda m, args, out: out * 0.5)
    try:
        hooked = logits()
        with norms:
            torch.testing.assert_close(logits(), hooked, atol=1e-4, rtol=1e-4)
    finally:
        hook.remove()
    assert (hooked - plain).abs().max() > 1e-2  # the hook mattered


# --------------------------------------------------------------------------- other models
def test_other_models_keep_their_layers_with_one_log_line(caplog):
    """Gemma's norm is (1 + w) * x: not fused; the engine decodes it plainly and says so once."""
    torch.manual_seed(0)
    config = GemmaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        pad_token_id=PAD,
        eos_token_id=NO_EOS,
        attn_implementation="sdpa",
    )
    model = sharpen(GemmaForCausalLM(config))
    ids, mask = prompts(128, seed=5)
    _, plain = greedy(model, False, ids, mask, 6)
    with caplog.at_level(logging.INFO, logger="mtrl.rollout.engine"):
        engine, fused = greedy(model, True, ids, mask, 6)
        engine.generate(ids, mask)
    lines = [r.getMessage() for r in caplog.records if "decoder layers" in r.getMessage()]
    assert (
        len(lines) == 1 and "plain decoder layers" in lines[0] and "GemmaDecoderLayer" in lines[0]
    )
    assert len(engine._norms) == 0
    assert torch.equal(fused.completion_ids, plain.completion_ids)


def test_plan_reasons_and_a_non_silu_mlp():
    assert FusedNorms().reason == "no model" and len(FusedNorms()) == 0
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="gelu",
    )
    model = LlamaForCausalLM(config).eval()
    norms = FusedNorms(model)  # layers fused, the GELU MLPs keep their own forward
    assert len(norms) == 2 and norms.mlps == 0
    assert norms.summary.endswith(
        "2 decoder layers decode with fused add+RMSNorm, 0 with fused SiLU-mul"
    )
    model.model.layers[1].post_attention_layernorm = torch.nn.LayerNorm(32)
    assert "not Llama-style RMSNorm" in FusedNorms(model).reason
    assert FusedNorms(torch.nn.Sequential(torch.nn.Linear(2, 2))).reason.startswith("no decoder")


# What the fused forwards replace, as transformers writes it (statements of each forward's body).
REPLACED = {
    "DecoderLayer": """
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return hidden_states
    """,
    "RMSNorm": """
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)
    """,
    "MLP": """
        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return down_proj
    """,
}


def statements(code: str) -> list[str]:
    """Code as normalised statements (ast.unparse), a function's body if it is one."""
    tree = ast.parse(textwrap.dedent(code)).body
    if isinstance(tree[0], ast.FunctionDef):
        tree = tree[0].body
    return [ast.unparse(node) for node in tree]


@pytest.mark.parametrize(
    "kind,names", [("DecoderLayer", fn.DECODER_LAYERS), ("RMSNorm", fn.RMS_NORMS), ("MLP", fn.MLPS)]
)
def test_listed_classes_compute_what_the_fused_forward_replaces(kind, names):
    """Each listed transformers class's forward is the code the fused one replaces (a
    transformers upgrade that changes one fails here instead of decoding something else)."""
    import importlib

    for name in names:
        family = name.removesuffix(kind).lower()
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        source = inspect.getsource(getattr(module, name).forward)
        assert statements(source) == statements(REPLACED[kind]), name


# --------------------------------------------------------------------------- config
def test_fused_norms_key(smoke_config):
    assert smoke_config().rollout.fused_norms is False
    assert smoke_config("rollout.fused_norms=true").rollout.fused_norms is True
    with pytest.raises(ValueError, match=r"^rollout\.fused_norms"):
        smoke_config("rollout.fused_norms=maybe")


# --------------------------------------------------------------------------- bf16: near-ties
def completion_logits(model, ids, mask, completions):
    """Teacher-forced logits (B, T, V) in fp32 of the distributions completions (B, T) were
    drawn from: column j is the model's output at position P + j - 1."""
    full = torch.cat([ids, completions], 1)
    attn = torch.cat([mask, torch.ones_like(completions, dtype=mask.dtype)], 1)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)  # left padding, as the engine counts them
    with torch.no_grad():
        logits = model(full, attention_mask=attn, position_ids=positions).logits.float()
    return logits[:, ids.shape[1] - 1 : -1]


def divergences(model, ids, mask, a, b):
    """Where greedy completions a and b (B, T) first differ in each row: (row, column, gap),
    gap = |logit of a's token - logit of b's token| there under `model`, teacher-forced on a's
    tokens (the distribution both were drawn from, up to their rounding)."""
    logits = completion_logits(model, ids, mask, a)
    found = []
    for row, col in enumerate((a != b).int().argmax(1).tolist()):
        if a[row, col] != b[row, col]:
            at = logits[row, col]
            found.append((row, col, (at[a[row, col]] - at[b[row, col]]).abs().item()))
    return found


def test_divergence_check_reports_a_token_that_is_no_near_tie():
    """The bf16 check below can fail: a token swapped for the least likely one is reported
    with its logit gap; identical completions report nothing. In fp32 the teacher-forced
    logits' argmax is the greedy decode (the columns line up)."""
    model = awkward_qwen2()
    ids, mask = prompts(model.config.vocab_size)
    _, plain = greedy(model, False, ids, mask, 8)
    a = plain.completion_ids
    logits = completion_logits(model, ids, mask, a)
    assert torch.equal(logits.argmax(-1), a)
    assert divergences(model, ids, mask, a, a.clone()) == []
    b = a.clone()
    b[2, 3] = logits[2, 3].argmin()
    [(row, col, gap)] = divergences(model, ids, mask, a, b)
    assert (row, col) == (2, 3) and gap > 10 * BF16_NEAR_TIE


# bf16 logits of this model differ from fp32 ones by up to ~1.1 (mean 0.2; logits ~60, median
# top-1 gap 5, CPU 2026-12-06), and 5% of positions have a top-1 gap under 0.5: two bf16 decodes
# whose norms sum in different orders may flip such a near-tie. Two bf16 decodes that each err
# by up to ~1.1 can disagree where the exact (fp32) gap is below ~2 at worst.
BF16_NEAR_TIE = 1.5


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("compile_decode", [False, True])
def test_cuda_graph_fused_norms_bf16_greedy_equal_up_to_near_ties(compile_decode):
    """bf16 on a GPU, CUDA graphs (and torch.compile around the fused ops): most rows give the
    plain decode's greedy tokens, and a row that differs does so first at a near-tie of the
    exact logits (an fp32 copy of the same bf16 weights): bf16 rounding, not a wrong norm,
    which would change most rows."""
    # SmolLM2-135M's widths (head dim 64: the split-KV kernel serves the attention)
    sizes = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9)
    model = awkward_qwen2(**sizes, num_key_value_heads=3).to(device="cuda", dtype=torch.bfloat16)
    exact = awkward_qwen2(**sizes, num_key_value_heads=3).to("cuda")
    exact.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    fuse_projections(model)
    ids, mask = prompts(model.config.vocab_size, lengths=(9, 5, 2, 7) * 8, device="cuda")
    _, plain = greedy(model, False, ids, mask, 16, compile_decode=compile_decode)
    engine, fused = greedy(model, True, ids, mask, 16, compile_decode=compile_decode)
    assert fused.used_cuda_graph and len(engine._norms) == 3
    found = divergences(exact, ids, mask, plain.completion_ids, fused.completion_ids)
    assert len(found) <= len(ids) // 2, found
    assert all(gap <= BF16_NEAR_TIE for _, _, gap in found), found
