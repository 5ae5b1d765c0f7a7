"""transformers integration: attn_implementation="pbs" on a tiny random Llama/Qwen2."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import pbs.hf
from pbs import kernels

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float32
TOL = dict(atol=3e-2, rtol=3e-2) if DTYPE == torch.bfloat16 else dict(atol=2e-4, rtol=1e-3)
pytestmark = pytest.mark.skipif(
    DEV == "cpu" and not kernels.interpreting(), reason="Triton needs a GPU or TRITON_INTERPRET=1"
)


def tiny(kind: str):
    torch.manual_seed(0)
    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
    )
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    return model.to(DEV, DTYPE).eval()


@pytest.fixture
def registered():
    yield pbs.hf.register(block_size=16, segment_size=32, threshold=1.0, min_seq_len=0)
    pbs.hf.register()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("backend", ["triton", "flex"])
def test_generate_matches_sdpa_at_threshold_one(registered, kind, backend):
    pbs.hf.register(block_size=16, segment_size=32, threshold=1.0, min_seq_len=0, backend=backend)
    model = tiny(kind)
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(1)).to(DEV)
    mask = torch.ones_like(ids)
    model.set_attn_implementation("sdpa")
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    model.set_attn_implementation("pbs")
    before = dict(pbs.hf.calls)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref)
    # prefill went through PBS (one call per layer), decoding steps through dense SDPA
    assert pbs.hf.calls["pbs"] - before["pbs"] == 2
    assert pbs.hf.calls["dense"] - before["dense"] == 2 * 5


@pytest.mark.parametrize("threshold", [1.0, 0.6])
def test_left_padded_batch_matches_per_sequence_logits(registered, threshold):
    pbs.hf.register(block_size=16, segment_size=32, threshold=threshold, min_seq_len=0)
    model = tiny("llama")
    g = torch.Generator().manual_seed(2)
    lengths = [77, 45, 21]  # off the block grid; the longest spans three segments
    n = max(lengths)
    ids = torch.zeros(3, n, dtype=torch.long)
    mask = torch.zeros(3, n, dtype=torch.long)
    for i, L in enumerate(lengths):
        ids[i, n - L :] = torch.randint(1, 128, (L,), generator=g)
        mask[i, n - L :] = 1
    ids, mask = ids.to(DEV), mask.to(DEV)
    model.set_attn_implementation("pbs")
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits.float()
        for i, L in enumerate(lengths):
            alone = model(ids[i : i + 1, n - L :]).logits.float()
            torch.testing.assert_close(padded[i, n - L :], alone[0], **TOL)
        if threshold == 1.0:  # and then it is exactly what sdpa gives
            model.set_attn_implementation("sdpa")
            sdpa = model(ids, attention_mask=mask).logits.float()
            valid = mask.bool()
            torch.testing.assert_close(padded[valid], sdpa[valid], **TOL)
    assert not padded.isnan().any()


def test_short_prompts_and_cached_prefixes_use_dense(registered):
    pbs.hf.register(block_size=16, segment_size=32, threshold=0.5, min_seq_len=64)
    model = tiny("qwen2")
    model.set_attn_implementation("pbs")
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(3)).to(DEV)
    before = dict(pbs.hf.calls)
    with torch.no_grad():
        first = model(ids[:, :30], use_cache=True)
        model(ids[:, 30:], cache=first.past_key_values)  # cached prefix
    assert pbs.hf.calls["pbs"] == before["pbs"]
    assert pbs.hf.calls["dense"] - before["dense"] == 4


def completion_logprobs(model, ids, prompt_len):
    """(B, completion) log-probs of the tokens after the prompt."""
    logp = model(ids).logits[:, prompt_len - 1 : -1].float().log_softmax(-1)
    return logp.gather(-1, ids[:, prompt_len:, None])[..., 0]


def test_training_forwards_run_pbs_and_match_no_grad(registered, monkeypatch, caplog):
    """Rollout (no grad) and training (grad) forwards give the same completion log-probs, the
    training forward runs the sparse path (logged once), and its gradients are PBS's."""
    pbs.hf.register(block_size=16, segment_size=32, threshold=0.6, min_seq_len=32)
    model = tiny("llama")
    model.set_attn_implementation("pbs")
    ids = torch.randint(1, 128, (2, 88), generator=torch.Generator().manual_seed(4)).to(DEV)
    prompt_len = 68  # the completion's query blocks (4, 5) choose among 4 earlier key blocks
    with torch.no_grad():
        rollout = completion_logprobs(model, ids, prompt_len)
    monkeypatch.setitem(pbs.hf.calls, "pbs_grad", 0)  # as in a fresh process
    before = dict(pbs.hf.calls)
    with caplog.at_level("INFO", logger="pbs.hf"):
        train = completion_logprobs(model, ids, prompt_len)
        # a second training forward (shorter, still past min_seq_len): not logged again
        completion_logprobs(model, ids[:, :40], 30)
    assert train.requires_grad
    torch.testing.assert_close(train.detach(), rollout, **TOL)
    assert pbs.hf.calls["pbs_grad"] - before["pbs_grad"] == 2 * 2  # two forwards, two layers
    assert pbs.hf.calls["dense"] == before["dense"]
    said = [r for r in caplog.records if "training forwards use the sparse path" in r.message]
    assert len(said) == 1
    train.sum().backward()
    sparse_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    # At this threshold the sparse attention differs from dense, and so do the gradients.
    model.zero_grad()
    model.set_attn_implementation("sdpa")
    completion_logprobs(model, ids, prompt_len).sum().backward()
    dense_grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert sparse_grad.isfinite().all() and sparse_grad.norm() > 0
    assert (sparse_grad - dense_grad).norm() > 1e-3 * dense_grad.norm()


def test_training_gradients_equal_sdpa_at_threshold_one(registered):
    model = tiny("qwen2")
    ids = torch.randint(1, 128, (2, 70), generator=torch.Generator().manual_seed(5)).to(DEV)
    grads = {}
    for impl in ("pbs", "sdpa"):
        model.zero_grad()
        model.set_attn_implementation(impl)
        completion_logprobs(model, ids, 50).sum().backward()
        grads[impl] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["pbs"], grads["sdpa"], strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_left_padded_training_batch_has_per_sequence_gradients(registered):
    """A padded batch with gradients: each row's loss gives the gradients it gives alone."""
    pbs.hf.register(block_size=16, segment_size=32, threshold=0.6, min_seq_len=32)
    model = tiny("llama")
    model.set_attn_implementation("pbs")
    g = torch.Generator().manual_seed(6)
    lengths = [80, 45]
    n = max(lengths)
    ids = torch.zeros(2, n, dtype=torch.long)
    mask = torch.zeros(2, n, dtype=torch.long)
    for i, L in enumerate(lengths):
        ids[i, n - L :] = torch.randint(1, 128, (L,), generator=g)
        mask[i, n - L :] = 1
    ids, mask = ids.to(DEV), mask.to(DEV)
    weight = model.model.layers[0].self_attn.k_proj.weight
    before = dict(pbs.hf.calls)
    logits = model(ids, attention_mask=mask).logits.float()
    (logits * mask[..., None]).sum().backward()
    assert pbs.hf.calls["pbs_grad"] - before["pbs_grad"] == 2  # both layers, sparse
    padded = weight.grad.clone()
    model.zero_grad()
    for i, L in enumerate(lengths):
        model(ids[i : i + 1, n - L :]).logits.float().sum().backward()  # accumulates
    torch.testing.assert_close(padded, weight.grad, **TOL)
