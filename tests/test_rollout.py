"""RolloutEngine on a tiny random Qwen2: greedy == generate, padding/early stop, log-prob and
temperature alignment, the sampled distribution per class, fallbacks; CUDA-graph tests on GPU."""

import logging

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import pbs.hf as pbs_hf
from mtrl.rollout import RolloutEngine, UnsupportedModelError, fuse_projections
from mtrl.rollout.decode_attention import decode_attention
from mtrl.rollout.fused import ProjectionGroups
from mtrl.sampling import MultiTemperatureConfig, MultiTemperatureSampler, truncate
from mtrl.triton_device import triton_runs_on

VOCAB = 128
PAD = 1
NO_EOS = 2  # an id whose logit we never make likely; used where rows must not stop


def tiny_config(**kw):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        eos_token_id=NO_EOS,
        attn_implementation="sdpa",
    )
    base.update(kw)
    return Qwen2Config(**base)


def tiny_model(seed=0, sharpen=40.0, dtype=torch.float32, device="cpu", **kw):
    torch.manual_seed(seed)
    m = Qwen2ForCausalLM(tiny_config(**kw)).eval()
    with torch.no_grad():  # a sharper head: entropies spread, greedy has no near-ties
        m.lm_head.weight.mul_(sharpen)
    return m.to(device=device, dtype=dtype)


def left_padded(lengths, width=None, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, width - n :] = 1
    return ids.to(device), mask.to(device)


def sampler(**kw):
    return MultiTemperatureSampler(MultiTemperatureConfig(**kw))


def hf_greedy(model, ids, mask, n, eos):
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=n,
        eos_token_id=eos,
        pad_token_id=PAD,
    )
    return out[:, ids.shape[1] :]


def pick_eos(completions: torch.Tensor) -> int:
    """A token that ends some rows early (not at step 0) but never appears in another row."""
    rows = [set(r.tolist()) for r in completions]
    for tok in range(3, VOCAB):
        hits = [tok in r for r in rows]
        firsts = [r.tolist().index(tok) for r in completions if tok in r.tolist()]
        if any(hits) and not all(hits) and min(firsts) >= 1:
            return tok
    raise AssertionError("no token ends some rows but not others; change the seed")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


# --------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("kv_bucket,check_every", [(256, 16), (16, 1), (16, 5)])
def test_greedy_matches_generate_with_early_eos(model, kv_bucket, check_every):
    ids, mask = left_padded([9, 5, 2, 7, 9, 4])
    n = 30
    eos = pick_eos(hf_greedy(model, ids, mask, n, NO_EOS))
    ref = hf_greedy(model, ids, mask, n, eos)
    eng = RolloutEngine(
        model,
        sampler(top_k=1, threshold_mode="fixed"),
        eos_token_ids=[eos],
        pad_token_id=PAD,
        max_new_tokens=n,
        check_every=check_every,
        kv_bucket=kv_bucket,
    )
    out = eng.generate(ids, mask)
    assert not out.used_cuda_graph
    assert torch.equal(out.completion_ids, ref)
    # mask: real tokens up to and including the first EOS, pad afterwards
    lengths = out.mask.sum(1)
    assert lengths.min() < n and lengths.max() == ref.shape[1]
    for row, m, length in zip(out.completion_ids, out.mask, lengths.tolist(), strict=True):
        assert m[:length].all() and not m[length:].any()
        toks = row[:length].tolist()
        if length < out.mask.shape[1] or eos in toks:
            assert toks[-1] == eos and eos not in toks[:-1]
        assert (row[length:] == PAD).all()
    # greedy: log-prob 0 under the top-1-truncated distribution, fills after the EOS
    assert torch.allclose(out.logprobs[out.mask], torch.zeros(()), atol=1e-6)
    assert (out.temperatures[~out.mask] == 1.0).all() and (out.entropies[~out.mask] == 0).all()
    assert not out.is_reasoning[~out.mask].any() and (out.logprobs[~out.mask] == 0).all()


def test_early_stop_and_reuse(model):
    """All rows finish -> the loop stops within check_every steps; a second call reuses buffers."""
    ids, mask = left_padded([6, 3, 5])
    n = 40
    free = hf_greedy(model, ids, mask, n, NO_EOS)
    # the token each row emits at step 2..: pick per-row EOS set so that every row ends early
    eos = sorted({int(r[2]) for r in free})
    ref = hf_greedy(model, ids, mask, n, eos)
    eng = RolloutEngine(model, sampler(top_k=1, threshold_mode="fixed"), eos, PAD, n, check_every=4)
    out = eng.generate(ids, mask)
    assert torch.equal(out.completion_ids, ref)
    assert out.completion_ids.shape[1] <= 3 and out.steps <= 4
    # a different prompt width in the same cache bucket reuses the slot and stays correct
    ids2, mask2 = left_padded([8, 2, 4], seed=5)
    ref2 = hf_greedy(model, ids2, mask2, n, eos)
    slot = eng._slot
    out2 = eng.generate(ids2, mask2)
    assert eng._slot is slot
    assert torch.equal(out2.completion_ids, ref2)


# --------------------------------------------------------------------------- alignment
def full_forward_logits(model, ids, mask, out):
    """Logits of a separate forward over prompt + completion; column j predicts token j."""
    seq = torch.cat([ids, out.completion_ids], 1)
    att = torch.cat([mask, out.mask.long()], 1)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=att, position_ids=pos).logits.float()
    p = ids.shape[1]
    return logits[:, p - 1 : p - 1 + out.completion_ids.shape[1]]


@pytest.mark.parametrize(
    "threshold_mode,apply_to", [("window", "all"), ("batch", "all"), ("window", "reasoning")]
)
def test_logprobs_temperatures_entropies_aligned(model, threshold_mode, apply_to):
    ids, mask = left_padded([9, 4, 7, 2, 9, 6, 5, 8])
    cfg = dict(
        threshold_mode=threshold_mode,
        reasoning_fraction=0.3,
        window_size=64,
        high_temperature=1.4,
        low_temperature=0.6,
        rollout_offsets=True,
        rollout_offset_step=0.1,
        offsets_apply_to=apply_to,
    )
    s = sampler(**cfg)
    offsets = s.offsets_tensor(num_generations=4, batch_size=ids.shape[0])
    eng = RolloutEngine(model, s, eos_token_ids=[5, 6, 7], pad_token_id=PAD, max_new_tokens=24)
    torch.manual_seed(3)
    out = eng.generate(ids, mask, temperature_offsets=offsets)
    m = out.mask
    assert m[:, 0].all()
    logits = full_forward_logits(model, ids, mask, out)
    # log_softmax(logits_{t-1} / T_t)[tok_t]: the temperature of column t divides column t's logits
    lp = torch.log_softmax(logits / out.temperatures[..., None], -1)
    lp = lp.gather(-1, out.completion_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(out.logprobs[m], lp[m], atol=1e-4, rtol=1e-4)
    ent = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(out.entropies[m], ent[m], atol=1e-4, rtol=1e-4)
    # temperature follows the class of the same column, plus the row's offset (on reasoning
    # tokens only, unless offsets_apply_to is "all")
    knowledge = 0.6 + (offsets[:, None] if apply_to == "all" else 0.0)
    base = torch.where(out.is_reasoning, 1.4 + offsets[:, None], knowledge)
    torch.testing.assert_close(out.temperatures[m], base[m].float())
    assert out.is_reasoning[m].any() and (~out.is_reasoning[m]).any()


# --------------------------------------------------------------------------- distribution
class ConstantHidden(torch.nn.Module):
    """Replaces the final norm: every position's hidden state is ``h``, so logits = W h."""

    def __init__(self, h):
        super().__init__()
        self.h = torch.nn.Parameter(h, requires_grad=False)

    def forward(self, x):
        return self.h.to(x.dtype).expand_as(x)


def fixed_logits_model(logits: torch.Tensor):
    """A tiny Qwen2 whose next-token logits are ``logits`` at every step (any input)."""
    m = tiny_model(sharpen=1.0, hidden_size=VOCAB, intermediate_size=64)
    with torch.no_grad():
        m.lm_head.weight.copy_(torch.eye(VOCAB))
    m.model.norm = ConstantHidden(logits.clone())
    return m


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = probs.double() * n
    keep = expected >= 5
    # pool the rare bins into one
    obs = torch.cat([counts[keep].double(), counts[~keep].double().sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    if exp[-1] < 5:
        obs, exp = obs[:-1], exp[:-1]
        obs[-1] += counts[~keep].sum()
        exp[-1] += expected[~keep].sum()
    stat = ((obs - exp) ** 2 / exp).sum()
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2.0))


@pytest.mark.parametrize("klass", ["reasoning", "knowledge"])
def test_sampled_distribution_per_class(klass):
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(VOCAB, generator=g) * (0.7 if klass == "reasoning" else 3.0)
    logits[NO_EOS] = -60.0  # the EOS is never drawn: every row runs the full length
    ent = float(-(torch.softmax(logits, 0) * torch.log_softmax(logits, 0)).sum())
    threshold = ent - 0.01 if klass == "reasoning" else ent + 0.01
    high, low = 1.5, 0.7
    s = sampler(
        threshold_mode="fixed",
        entropy_threshold=threshold,
        high_temperature=high,
        low_temperature=low,
        top_p=0.97,
    )
    model = fixed_logits_model(logits)
    rows, steps = 500, 40
    eng = RolloutEngine(model, s, [NO_EOS], PAD, steps, kv_bucket=64)
    ids = torch.full((rows, 3), 7, dtype=torch.long)
    torch.manual_seed(5)
    out = eng.generate(ids)
    assert out.mask.all() and out.completion_ids.shape == (rows, steps)
    temp = high if klass == "reasoning" else low
    assert out.is_reasoning.all() == (klass == "reasoning")
    assert (out.temperatures == temp).all()
    probs = torch.softmax(truncate((logits / temp)[None], top_p=0.97), -1)[0]
    counts = torch.bincount(out.completion_ids.flatten(), minlength=VOCAB)
    assert counts[probs == 0].sum() == 0
    assert chi_square_pvalue(counts, probs) > 1e-3
    torch.testing.assert_close(
        out.logprobs, torch.log(probs)[out.completion_ids], atol=1e-5, rtol=1e-5
    )


# --------------------------------------------------------------------------- model handling
def test_train_mode_and_checkpointing_restored():
    model = tiny_model()
    model.gradient_checkpointing_enable()
    model.train()
    ids, mask = left_padded([5, 3])
    ref = hf_greedy(model.eval(), ids, mask, 8, NO_EOS)
    model.train()
    eng = RolloutEngine(model, sampler(top_k=1, threshold_mode="fixed"), NO_EOS, PAD, 8)
    out = eng.generate(ids, mask)
    assert model.training and model.is_gradient_checkpointing
    assert torch.equal(out.completion_ids, ref)
    assert model.config._attn_implementation == "sdpa"


def test_lora_unmerged():
    peft = pytest.importorskip("peft")
    base = tiny_model()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    assert fuse_projections(base) == 4
    model = peft.get_peft_model(base, cfg)
    # q/v carry adapters, so q/k/v run separately; gate/up (no adapter) stay one GEMM.
    assert len(ProjectionGroups(model)) == 2
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    ids, mask = left_padded([6, 4, 2])
    ref = hf_greedy(model, ids, mask, 12, NO_EOS)
    with model.disable_adapter():
        plain = hf_greedy(model, ids, mask, 12, NO_EOS)
    assert not torch.equal(ref, plain)  # the adapter matters
    eng = RolloutEngine(model, sampler(top_k=1, threshold_mode="fixed"), NO_EOS, PAD, 12)
    assert torch.equal(eng.generate(ids, mask).completion_ids, ref)


# --------------------------------------------------------------------------- fused projections
def test_fused_projections_same_logits_through_training_and_saving(tmp_path):
    model = tiny_model()
    ids, mask = left_padded([6, 4])

    def logits():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits

    ref = logits()
    assert len(ProjectionGroups(model)) == 0  # from_config allocates each weight on its own
    assert fuse_projections(model) == 4  # 2 layers x (q/k/v, gate/up)
    assert fuse_projections(model) == 4  # already adjacent: nothing moves
    groups = ProjectionGroups(model)
    assert len(groups) == 4
    with groups:
        torch.testing.assert_close(logits(), ref)
        attn = model.model.layers[0].self_attn
        x = torch.randn(3, 32)
        q, k = attn.q_proj(x), attn.k_proj(x)
        # k is the column slice of q's one GEMM, computed once
        assert k.data_ptr() == q.data_ptr() + q.shape[-1] * q.element_size()
        torch.testing.assert_close(k, x @ attn.k_proj.weight.T + attn.k_proj.bias)
        other = torch.randn(3, 32)  # another input: its own GEMM, still right
        torch.testing.assert_close(
            attn.v_proj(other), other @ attn.v_proj.weight.T + attn.v_proj.bias
        )
    assert "forward" not in vars(attn.q_proj)  # removed on exit

    # Training updates the parameters in place: the fused views see the new weights.
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    opt.step()
    model.eval()
    trained = logits()
    assert not torch.allclose(trained, ref)
    with groups:
        torch.testing.assert_close(logits(), trained)

    model.save_pretrained(tmp_path)  # shared storage: transformers saves copies
    reloaded = Qwen2ForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, trained)

    model.to(torch.float64)  # new storage per parameter: no longer adjacent, nothing fused
    assert len(ProjectionGroups(model)) == 0


def test_engine_fused_projections_greedy_matches_generate(model):
    fused = tiny_model()
    fuse_projections(fused)
    ids, mask = left_padded([9, 5, 2, 7])
    ref = hf_greedy(model, ids, mask, 20, NO_EOS)
    outs = {}
    for on in (True, False):
        eng = RolloutEngine(
            fused, sampler(top_k=1, threshold_mode="fixed"), NO_EOS, PAD, 20, fused_projections=on
        )
        outs[on] = eng.generate(ids, mask).completion_ids
        assert len(eng._groups) == (4 if on else 0)
    assert torch.equal(outs[True], ref) and torch.equal(outs[False], ref)


def test_engine_reports_projection_groups_once_and_on_change(caplog):
    m = tiny_model()
    fuse_projections(m)
    ids, mask = left_padded([9, 5])
    eng = RolloutEngine(m, sampler(top_k=1, threshold_mode="fixed"), NO_EOS, PAD, 2)

    def reported() -> list[str]:
        out = [r.getMessage() for r in caplog.records if "projection groups" in r.getMessage()]
        caplog.clear()
        return out

    def move_storage() -> None:  # what ZeRO-3's gather does to every parameter
        for p in m.parameters():
            p.data = p.data.clone()

    with caplog.at_level(logging.INFO, logger="mtrl.rollout.engine"):
        eng.generate(ids, mask)
        assert reported() == ["rollout engine: 4 projection groups run as one GEMM"]
        eng.generate(ids, mask)
        assert reported() == []
        move_storage()
        eng.generate(ids, mask)
        assert reported() == ["rollout engine: 0 projection groups run as one GEMM"]
        fuse_projections(m)
        eng.generate(ids, mask)
        assert reported() == ["rollout engine: 4 projection groups run as one GEMM"]
        move_storage()
        fuse_projections(m)  # new buffers, the same groups: nothing new to say
        eng.generate(ids, mask)
        assert reported() == []
        assert len(eng._groups) == 4


def test_unsupported_cache_raises():
    model = tiny_model(use_sliding_window=True, sliding_window=8, max_window_layers=0)
    with pytest.raises(UnsupportedModelError, match="sliding|full-attention"):
        RolloutEngine(model, sampler(), NO_EOS, PAD, 4)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        RolloutEngine(model, sampler(), NO_EOS, PAD, 0)
    eng = RolloutEngine(model, sampler(), NO_EOS, PAD, 4)
    with pytest.raises(ValueError, match="input_ids"):
        eng.generate(torch.ones(3, dtype=torch.long))


# --------------------------------------------------------------------------- split-KV kernel
# The engine's own test for where the kernel can run.
needs_triton = pytest.mark.skipif(
    not triton_runs_on("cuda" if torch.cuda.is_available() else "cpu"),
    reason="Triton needs a GPU or TRITON_INTERPRET=1",
)


@pytest.fixture(scope="module")
def model_d16():
    """Head dim 16: the smallest the split-KV kernel takes."""
    return tiny_model(hidden_size=64, intermediate_size=128)


@needs_triton
def test_split_kv_kernel_greedy_matches_generate(model_d16):
    """Decode attention through the Triton kernel (the interpreter here) over the whole
    cache, skipping the keys after each step's position: the same tokens as generate."""
    ids, mask = left_padded([9, 5, 2, 7])
    n = 16
    eos = pick_eos(hf_greedy(model_d16, ids, mask, n, NO_EOS))
    ref = hf_greedy(model_d16, ids, mask, n, eos)
    greedy = sampler(top_k=1, threshold_mode="fixed")
    eng = RolloutEngine(model_d16, greedy, eos, PAD, n, kv_bucket=32, split_kv_attention=True)
    out = eng.generate(ids, mask)
    assert eng._split_kv and eng._bucket(ids.shape[1], 64) == 64  # one key range: the cache
    assert torch.equal(out.completion_ids, ref)


@needs_triton
def test_compiled_decode_with_split_kv_is_one_graph(model_d16, monkeypatch):
    """The kernel is an operator torch.compile traces through: no graph break in the decode
    forward (the reason its elementwise work fuses), compiled once, and the same tokens as
    eager SDPA.
    Dynamo only (backend "eager"): the breaks are its decision, inductor's code is not."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="eager", **kw))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ids, mask = left_padded([9, 5, 2, 7])
    greedy = dict(top_k=1, threshold_mode="fixed")
    ref = RolloutEngine(model_d16, sampler(**greedy), NO_EOS, PAD, 12, split_kv_attention=False)
    eng = RolloutEngine(
        model_d16,
        sampler(**greedy),
        NO_EOS,
        PAD,
        12,
        kv_bucket=32,
        split_kv_attention=True,
        compile_decode=True,
    )
    out = eng.generate(ids, mask)
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    # The one break left is in the sampler's own compiled function (truncate, kept eager).
    assert all("truncate" in b for b in breaks), breaks
    # One graph for the decode forward, one each for the step's mask and the record of the
    # draw, a few for the sampler; not one per step (a guard on a value that changes every
    # step would recompile each of the 10 compiled steps).
    assert graphs <= 7, graphs
    assert torch.equal(out.completion_ids, ref.generate(ids, mask).completion_ids)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA runs the kernel: nothing to refuse")
def test_split_kv_kernel_needs_a_device_that_runs_triton(model_d16, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    eng = RolloutEngine(model_d16, sampler(), NO_EOS, PAD, 4, split_kv_attention=True)
    ids, mask = left_padded([3, 2])
    with pytest.raises(ValueError, match="split_kv_attention=True needs CUDA or TRITON_INTERPRET"):
        eng.generate(ids, mask)


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cuda_graph_equals_eager_fp32():
    model = tiny_model(device="cuda")
    ids, mask = left_padded([9, 4, 7, 2, 9, 6, 5, 8] * 4, device="cuda")
    cfg = dict(threshold_mode="window", window_size=256, reasoning_fraction=0.3, top_p=0.95)
    runs = {}
    for graph in (True, False):
        s = sampler(**cfg)
        eng = RolloutEngine(
            model, s, [5, 6, 7], PAD, 40, use_cuda_graph=graph, check_every=8, kv_bucket=16
        )
        eng.generate(ids, mask)  # first call captures (graph) / warms up
        s.reset_window()
        torch.manual_seed(1234)
        out = eng.generate(ids, mask)
        assert out.used_cuda_graph == graph
        runs[graph] = out
    g, e = runs[True], runs[False]
    assert torch.equal(g.completion_ids, e.completion_ids)
    assert torch.equal(g.mask, e.mask)
    torch.testing.assert_close(g.logprobs, e.logprobs)
    torch.testing.assert_close(g.temperatures, e.temperatures)
    assert torch.equal(g.is_reasoning, e.is_reasoning)


def assert_greedy_equal_up_to_near_ties(model, ids, mask, got, ref, rel=0.02):
    """Rows equal, or equal up to a position where both tokens are within bf16 noise of the max.

    Different kernels (HF's repeat_kv SDPA over a dynamic cache vs the engine's folded-GQA
    attention over a static cache, eager vs graph-captured cuBLAS) round bf16 differently, so
    exact greedy equality holds only until the first near-tie; after it the rows diverge.
    """
    width = min(got.shape[1], ref.shape[1])
    for r in range(got.shape[0]):
        diff = (got[r, :width] != ref[r, :width]).nonzero()
        if diff.numel() == 0:
            continue
        j = int(diff[0])
        seq = torch.cat([ids[r], got[r, :j]])[None]
        att = torch.cat([mask[r], torch.ones_like(got[r, :j])])[None]
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=seq, attention_mask=att, position_ids=pos).logits[0, -1]
        logits = logits.float()
        tol = rel * float(logits.abs().max()) + 0.05
        top = float(logits.max())
        for tok in (int(got[r, j]), int(ref[r, j])):
            assert top - float(logits[tok]) <= tol, (r, j, top, float(logits[tok]), tol)


@pytest.mark.gpu
def test_bf16_greedy_graph_matches_generate(monkeypatch):
    # head dim 16: decode attention runs through the split-KV Triton kernel
    model = tiny_model(device="cuda", dtype=torch.bfloat16, hidden_size=64, intermediate_size=128)
    fuse_projections(model)
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return decode_attention(*args, **kwargs)

    monkeypatch.setattr("mtrl.rollout.engine.decode_attention", counted)
    ids, mask = left_padded([9, 5, 2, 7, 9, 4, 8, 3], device="cuda")
    n = 40
    eos = pick_eos(hf_greedy(model, ids, mask, n, NO_EOS))
    ref = hf_greedy(model, ids, mask, n, eos)
    eng = RolloutEngine(model, sampler(top_k=1, threshold_mode="fixed"), eos, PAD, n, kv_bucket=16)
    out = eng.generate(ids, mask)  # step 1 eager, then captured graphs
    assert out.used_cuda_graph
    out2 = eng.generate(ids, mask)  # every step replayed from the graphs
    eager = RolloutEngine(
        model, sampler(top_k=1, threshold_mode="fixed"), eos, PAD, n, use_cuda_graph=False
    ).generate(ids, mask)
    assert calls  # the kernel served the eager steps and the captures
    assert len(eng._slot.graphs) == 1  # one graph over the whole cache serves every step
    exact = [torch.equal(o.completion_ids, ref) for o in (out, out2, eager)]
    print("bf16 greedy == generate exactly (first call, replayed, eager):", exact)
    for o in (out, out2, eager):
        assert_greedy_equal_up_to_near_ties(model, ids, mask, o.completion_ids, ref)
    assert_greedy_equal_up_to_near_ties(model, ids, mask, out2.completion_ids, eager.completion_ids)


@pytest.mark.gpu
def test_compile_decode_graph_matches_eager_fp32():
    model = tiny_model(device="cuda")
    fuse_projections(model)  # the trainer's layout: compiled q/k/v and gate/up as one GEMM each
    ids, mask = left_padded([9, 4, 7, 2], device="cuda")
    ref = RolloutEngine(
        model,
        sampler(top_k=1, threshold_mode="fixed"),
        NO_EOS,
        PAD,
        20,
        use_cuda_graph=False,
        fused_projections=False,
    ).generate(ids, mask)
    eng = RolloutEngine(
        model, sampler(top_k=1, threshold_mode="fixed"), NO_EOS, PAD, 20, compile_decode=True
    )
    eng.generate(ids, mask)
    out = eng.generate(ids, mask)
    assert out.used_cuda_graph and len(eng._groups) == 4
    assert torch.equal(out.completion_ids, ref.completion_ids)


# --------------------------------------------------------------------------- the one generate
@pytest.mark.parametrize("backend", ["engine", "generate"])
def test_generate_masks_after_a_mid_completion_eos(backend):
    """Both backends of `generate` return each row's tokens up to its first EOS (mid-completion
    for some rows, none for others) and neutral fills after it."""
    from mtrl.rollout import engine_for, generate

    model = tiny_model(seed=3)
    ids, mask = left_padded([9, 5, 2, 7, 9, 4])
    n = 24
    eos = pick_eos(hf_greedy(model, ids, mask, n, NO_EOS))
    greedy = sampler(top_k=1, threshold_mode="fixed")
    common = dict(max_new_tokens=n, eos_token_ids=[eos], pad_token_id=PAD)
    engine = engine_for(model, greedy, "test", **common) if backend == "engine" else None
    out = generate(model, ids, mask, sampler=greedy, engine=engine, **common)
    assert out.backend == backend
    ref = hf_greedy(model, ids, mask, n, eos)  # transformers' own EOS handling
    assert torch.equal(out.completion_ids, ref)
    lengths = out.lengths
    assert lengths.min() < n and lengths.max() == out.completion_ids.shape[1]
    for row, m, length in zip(out.completion_ids, out.mask, lengths.tolist(), strict=True):
        assert m[:length].all() and not m[length:].any()
        toks = row[:length].tolist()
        assert eos not in toks[:-1]
        assert (row[length:] == PAD).all()
    assert (out.temperatures[~out.mask] == 1.0).all() and (out.entropies[~out.mask] == 0).all()
    assert not out.is_reasoning[~out.mask].any() and (out.logprobs[~out.mask] == 0).all()
    assert (out.entropies[out.mask] > 0).all()


def test_completion_mask_keeps_up_to_the_first_eos():
    from mtrl.rollout import completion_mask

    ids = torch.tensor([[5, 7, 9, 7], [7, 5, 5, 5], [5, 5, 5, 5], [9, 9, 7, 7]])
    either = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]).bool()
    only_7 = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]]).bool()
    assert torch.equal(completion_mask(ids, [7, 9]), either)
    assert torch.equal(completion_mask(ids, [7]), only_7)
    assert completion_mask(ids, []).all()


def test_engine_cache_reuses_per_role_and_refuses_once(caplog):
    from mtrl.rollout import engine_for, generate

    model = tiny_model(seed=4)
    s_train, s_eval = sampler(threshold_mode="fixed"), sampler(threshold_mode="fixed")
    common = dict(max_new_tokens=4, eos_token_ids=[NO_EOS], pad_token_id=PAD)
    train = engine_for(model, s_train, "train", **common)
    assert engine_for(model, s_train, "train", **common) is train
    evaluation = engine_for(model, s_eval, "eval", **common)
    assert evaluation is not train and engine_for(model, s_train, "train", **common) is train
    assert engine_for(model, s_eval, "eval", **{**common, "max_new_tokens": 5}) is not evaluation

    # A model the engine can't serve: None from the cache, transformers generate, one warning.
    sliding = tiny_model(seed=4, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    with caplog.at_level(logging.INFO, logger="mtrl.rollout.generate"):
        assert engine_for(sliding, s_eval, "eval", **common) is None
        ids, mask = left_padded([3, 5])
        for _ in range(2):
            out = generate(sliding, ids, mask, sampler=s_eval, **common)
            assert out.backend == "generate"
    lines = [r.getMessage() for r in caplog.records if r.name == "mtrl.rollout.generate"]
    assert len(lines) == 1 and "can't" in lines[0]


# --------------------------------------------------------------------------- weight mirror
def move_and_change(model, scale=0.3, seed=7):
    """What a ZeRO-3 gather does to every parameter (new storage), with new values as after
    an optimizer step."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.data = p.data + scale * p.data.std().nan_to_num() * torch.randn(p.shape, generator=g)


def test_weight_mirror_follows_moved_parameters_at_fixed_addresses():
    from mtrl.rollout import WeightMirror

    live = tiny_model(seed=2)
    ids, mask = left_padded([9, 5, 2, 7])
    n = 16
    mirror = WeightMirror(live)
    assert all(p.data_ptr() not in set(mirror.data_ptrs()) for p in live.parameters())
    eng = RolloutEngine(mirror.model, sampler(top_k=1, threshold_mode="fixed"), NO_EOS, PAD, n)
    first = eng.generate(ids, mask).completion_ids
    assert torch.equal(first, hf_greedy(live, ids, mask, n, NO_EOS))
    assert len(eng._groups) == 4  # the mirror lays q/k/v and gate/up out as one buffer each
    ptrs, fingerprint = mirror.data_ptrs(), eng._fingerprint()

    move_and_change(live)
    mirror.refresh(live)
    assert mirror.data_ptrs() == ptrs and eng._fingerprint() == fingerprint
    fresh = Qwen2ForCausalLM(live.config).eval()  # a model of the new values, built anew
    fresh.load_state_dict(live.state_dict())
    with torch.no_grad():
        want = fresh(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(mirror.model(input_ids=ids, attention_mask=mask).logits, want)
    second = eng.generate(ids, mask).completion_ids
    assert torch.equal(second, hf_greedy(fresh, ids, mask, n, NO_EOS))
    assert not torch.equal(second, first)  # the engine saw the new weights


def test_weight_mirror_keeps_ties_and_drops_hooks():
    from mtrl.rollout import WeightMirror

    live = tiny_model(tie_word_embeddings=True)
    assert live.lm_head.weight is live.model.embed_tokens.weight

    def fail(*_):
        raise AssertionError("a live model's hook ran in the mirror")

    live.model.register_forward_hook(fail)
    live.model.layers[0].mlp.register_forward_pre_hook(fail)
    mirror = WeightMirror(live)
    m = mirror.model
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert m.model.rotary_emb.inv_freq.data_ptr() != live.model.rotary_emb.inv_freq.data_ptr()
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    ids, mask = left_padded([5, 3])
    with torch.no_grad():
        m(input_ids=ids, attention_mask=mask)  # no hook: no AssertionError


def test_weight_mirror_lora_runs_unmerged_adapters():
    peft = pytest.importorskip("peft")
    from mtrl.rollout import WeightMirror

    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    live = peft.get_peft_model(tiny_model(seed=5), cfg).eval()
    ids, mask = left_padded([6, 4, 2])
    mirror = WeightMirror(live)
    assert type(mirror.model) is type(live)
    eng = RolloutEngine(mirror.model, sampler(top_k=1, threshold_mode="fixed"), NO_EOS, PAD, 12)
    assert torch.equal(
        eng.generate(ids, mask).completion_ids, hf_greedy(live, ids, mask, 12, NO_EOS)
    )
    ptrs = mirror.data_ptrs()
    g = torch.Generator().manual_seed(3)
    for name, p in live.named_parameters():  # a trained adapter, in new storage
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.5
    mirror.refresh(live)
    ref = hf_greedy(live, ids, mask, 12, NO_EOS)
    with live.disable_adapter():
        assert not torch.equal(ref, hf_greedy(live, ids, mask, 12, NO_EOS))  # adapters matter
    assert torch.equal(eng.generate(ids, mask).completion_ids, ref)
    assert mirror.data_ptrs() == ptrs


def test_weight_mirror_refuses_partitioned_or_changed_parameters():
    from mtrl.rollout import WeightMirror

    live = tiny_model()
    mirror = WeightMirror(live)
    # What ZeRO-3 leaves outside the gather: an empty tensor and the full size on the side.
    weight = live.model.layers[1].self_attn.o_proj.weight
    full, weight.data = weight.data, torch.empty(0)
    weight.ds_numel = full.numel()
    with pytest.raises(ValueError, match=r"^weight mirror: model.layers.1.self_attn.o_proj.weight"):
        mirror.refresh(live)
    with pytest.raises(ValueError, match="partitioned by ZeRO-3"):
        WeightMirror(live)
    weight.data = full[:, :-1].contiguous()  # a new shape: not the mirror's model any more
    del weight.ds_numel
    with pytest.raises(ValueError, match="o_proj.weight\\); mirror_for"):
        mirror.refresh(live)
    assert not mirror.matches(live)


def test_mirror_for_caches_declines_once_and_rebuilds_on_change(caplog):
    from mtrl.rollout import is_mirror, mirror_for
    from mtrl.rollout.mirror import RESERVE_BYTES, mirror_bytes

    live = tiny_model(seed=6)
    need = mirror_bytes(live)
    assert need == sum(p.numel() * 4 for p in live.parameters()) + sum(
        b.numel() * b.element_size() for b in live.buffers()
    )
    with caplog.at_level(logging.INFO, logger="mtrl.rollout.mirror"):
        mirror = mirror_for(live, "auto", available=need + RESERVE_BYTES)  # just fits
        assert mirror is not None and is_mirror(mirror.model) and not is_mirror(live)
        assert mirror_for(live, "auto") is mirror
        live.lm_head.weight = torch.nn.Parameter(live.lm_head.weight.data[:-1].clone())
        rebuilt = mirror_for(live, "auto")
        assert rebuilt is not mirror and rebuilt.model.lm_head.weight.shape[0] == VOCAB - 1

        small = tiny_model(seed=6)
        assert mirror_for(small, "auto", available=need + RESERVE_BYTES - 1) is None
        assert mirror_for(small, "auto", available=10 * need + RESERVE_BYTES) is None  # for good
        forced = tiny_model(seed=6)
        assert mirror_for(forced, "copy", available=0) is not None  # copy: no memory check
    lines = [r.getMessage() for r in caplog.records]
    declined = [line for line in lines if "transformers generate" in line]
    assert len(declined) == 1 and "rollout.zero3_weights=auto" in declined[0]
    assert sum("own copy of the weights" in line for line in lines) == 3
    assert sum("parameters changed" in line for line in lines) == 1


def test_wants_engine_under_zero3_only_with_a_mirror():
    from mtrl.rollout import wants_engine

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert wants_engine("auto", cuda, zero3=False)
    assert not wants_engine("auto", cuda, zero3=True)  # gathered weights move: no graphs
    assert wants_engine("auto", cuda, zero3=True, mirror=True)
    assert not wants_engine("auto", cpu, zero3=True, mirror=True)
    assert wants_engine("fast", cpu, zero3=True) and not wants_engine("hf", cuda, False, True)


def test_zero3_weights_key_is_validated(smoke_config):
    from mtrl.config import ConfigError
    from mtrl.rollout import RolloutConfig, Zero3Weights

    assert RolloutConfig().zero3_weights == Zero3Weights.auto == "auto"
    assert smoke_config("rollout.zero3_weights=copy").rollout.zero3_weights == "copy"
    with pytest.raises(ValueError, match=r"^rollout.zero3_weights: must be one of auto, copy, ge"):
        RolloutConfig(zero3_weights="gather").validate()
    with pytest.raises(ValueError, match=r"^rollout.zero3_weights: generate contradicts rollout"):
        RolloutConfig(engine="fast", zero3_weights="generate").validate()
    for bad in ("rollout.zero3_weights=gather", "rollout.zero3_weights=generate"):
        with pytest.raises(ConfigError, match="rollout.zero3_weights") as info:
            smoke_config(bad, "rollout.engine=fast")
        assert "\n" not in str(info.value)


def test_weight_mirror_runs_its_own_forward_not_a_wrapper_of_the_live_one():
    """TRL wraps the policy's forward on the instance (its fused log-prob head), closing over
    the live bound forward; the mirror must not call into the live model through it."""
    import functools

    from mtrl.rollout import WeightMirror

    live = tiny_model(seed=8)
    inner = live.forward
    live.forward = functools.wraps(inner)(lambda *a, **k: inner(*a, **k))
    live.model.layers[0].self_attn.sibling = live.model.layers[1].self_attn  # a plain attribute
    mirror = WeightMirror(live)
    assert mirror.model.model.layers[0].self_attn.sibling is mirror.model.model.layers[1].self_attn
    ids, mask = left_padded([6, 3])
    move_and_change(live)  # no refresh: the mirror keeps the old values
    with torch.no_grad():
        old = mirror.model(input_ids=ids, attention_mask=mask).logits
        assert not torch.allclose(old, live(input_ids=ids, attention_mask=mask).logits)
        mirror.refresh(live)
        torch.testing.assert_close(
            mirror.model(input_ids=ids, attention_mask=mask).logits,
            live(input_ids=ids, attention_mask=mask).logits,
        )


def test_compiled_engine_compiles_past_the_default_recompile_limit():
    """The engine raises dynamo's recompile limit for its calls: with the process's limit at
    2 (as if other engines over the same model had used it up), a compiled engine still
    compiles its step at a third batch size; at the limit its sampler and bookkeeping would
    run uncompiled for good (here dynamo raises instead)."""
    model = tiny_model(num_hidden_layers=1)
    eng = RolloutEngine(
        model, sampler(top_k=1, threshold_mode="fixed"), NO_EOS, PAD, 2, compile_decode=True
    )
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        for batch in (1, 2, 3):
            ids, mask = left_padded([5] * batch)
            assert eng.generate(ids, mask).completion_ids.shape == (batch, 2)


@pytest.mark.gpu
def test_compiled_prefill_matches_eager_fp32():
    """The prefill through torch.compile with dynamic shapes: greedy tokens equal the eager
    engine's at two prompt widths and batch sizes."""
    model = tiny_model(device="cuda")
    eager = RolloutEngine(model, sampler(top_k=1, threshold_mode="fixed"), NO_EOS, PAD, 12)
    eng = RolloutEngine(
        model, sampler(top_k=1, threshold_mode="fixed"), NO_EOS, PAD, 12, compile_prefill=True
    )
    for lengths in ([9, 4, 7, 2], [5, 13, 3]):
        ids, mask = left_padded(lengths, device="cuda")
        want = eager.generate(ids, mask)
        got = eng.generate(ids, mask)
        assert torch.equal(got.completion_ids, want.completion_ids)
    assert eng._compiled_prefill is not None


@pytest.mark.gpu
def test_compiled_prefill_runs_pbs_attention_eagerly():
    """A PBS-Attn policy with the compiled prefill: every layer's prefill attention still goes
    through PBS (called eagerly, between compiled pieces) at two widths, and the greedy tokens
    equal the eager prefill's."""
    pbs_hf.register(block_size=16, segment_size=32, threshold=0.6, min_seq_len=0)
    try:
        model = tiny_model(device="cuda", hidden_size=64, attn_implementation="pbs")
        greedy = dict(top_k=1, threshold_mode="fixed")
        eager = RolloutEngine(model, sampler(**greedy), NO_EOS, PAD, 6)
        eng = RolloutEngine(model, sampler(**greedy), NO_EOS, PAD, 6, compile_prefill=True)
        for lengths in ([70, 45, 21], [90, 33]):  # off the block grid, left-padded
            ids, mask = left_padded(lengths, device="cuda")
            want = eager.generate(ids, mask).completion_ids
            before = pbs_hf.calls["pbs"]
            got = eng.generate(ids, mask).completion_ids
            assert pbs_hf.calls["pbs"] - before == model.config.num_hidden_layers
            assert torch.equal(got, want)
    finally:
        pbs_hf.register()


@pytest.mark.gpu
def test_max_autotune_decode_matches_eager_fp32():
    """With inductor's GEMM autotuning the compiled decode keeps the eager engine's greedy
    tokens (whichever of its Triton tiles or cuBLAS wins each projection)."""
    model = tiny_model(device="cuda")
    ids, mask = left_padded([9, 4, 7, 2], device="cuda")
    greedy = dict(top_k=1, threshold_mode="fixed")
    want = RolloutEngine(model, sampler(**greedy), NO_EOS, PAD, 12, use_cuda_graph=False)
    eng = RolloutEngine(
        model, sampler(**greedy), NO_EOS, PAD, 12, compile_decode=True, max_autotune=True
    )
    out = eng.generate(ids, mask)
    assert out.used_cuda_graph
    assert torch.equal(out.completion_ids, want.generate(ids, mask).completion_ids)
