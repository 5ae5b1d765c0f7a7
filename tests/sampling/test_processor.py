import pytest
import torch
from transformers import LogitsProcessorList, Qwen2Config, Qwen2ForCausalLM

from mtrl.sampling import (
    MultiTemperatureConfig,
    MultiTemperatureLogitsProcessor,
    MultiTemperatureSampler,
)

VOCAB = 100
EOS = list(range(90, 100))  # ten EOS ids so that some rows finish within a few steps
PAD = 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    m = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # sharpen the random head so entropies spread across classes
        m.lm_head.weight.mul_(40.0)
    return m


def _generate(model, proc, batch=16, prompt_len=5, new=12, seed=0):
    torch.manual_seed(seed)
    prompt = torch.randint(1, 90, (batch, prompt_len))
    out = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new,
        min_new_tokens=0,
        eos_token_id=EOS,
        pad_token_id=PAD,
        logits_processor=LogitsProcessorList([proc]),
        return_dict_in_generate=True,
    )
    return prompt, out.sequences


def test_processor_records_align_with_generated_tokens(model):
    cfg = MultiTemperatureConfig(threshold_mode="batch", reasoning_fraction=0.3)
    sampler = MultiTemperatureSampler(cfg, generator=torch.Generator().manual_seed(1))
    proc = MultiTemperatureLogitsProcessor(sampler, eos_token_id=EOS)
    prompt, seq = _generate(model, proc)
    rec = proc.result(seq)
    completion = seq[:, prompt.shape[1] :]
    assert proc.prompt_len == prompt.shape[1]
    for name in ("tokens", "temperatures", "entropies", "is_reasoning", "logprobs", "active"):
        assert getattr(rec, name).shape == completion.shape, name
    assert rec.thresholds.shape == (completion.shape[1],)

    # every live position holds the token the sampler drew; finished rows hold padding
    act = rec.active
    assert torch.equal(rec.tokens[act], completion[act])
    assert torch.all(completion[~act] == PAD)
    assert (~act).any(), "no row finished: the EOS/padding path is untested"
    assert act[:, 0].all()
    # a row goes inactive right after its first EOS
    is_eos = torch.isin(completion, torch.tensor(EOS))
    seen_eos_before = (torch.cumsum(is_eos.long(), 1) - is_eos.long()) > 0
    assert torch.equal(act, ~seen_eos_before)
    # both classes occur, temperatures follow them
    assert rec.is_reasoning[act].any() and (~rec.is_reasoning[act]).any()
    expected_t = torch.where(rec.is_reasoning, cfg.high_temperature, cfg.low_temperature)
    torch.testing.assert_close(rec.temperatures, expected_t)

    # alignment: token j is drawn from the logits at position prompt_len + j - 1 divided by T_j
    with torch.no_grad():
        logits = model(seq).logits.float()
    p = prompt.shape[1]
    pred = logits[:, p - 1 : -1]  # predicts completion[:, j]
    ent = -(torch.softmax(pred, -1) * torch.log_softmax(pred, -1)).sum(-1)
    torch.testing.assert_close(rec.entropies[act], ent[act], atol=1e-4, rtol=1e-4)
    lp = torch.log_softmax(pred / rec.temperatures[..., None], -1)
    lp = lp.gather(-1, completion[..., None]).squeeze(-1)
    torch.testing.assert_close(rec.logprobs[act], lp[act], atol=1e-4, rtol=1e-4)


def test_processor_resets_between_generations_and_keeps_window(model):
    cfg = MultiTemperatureConfig(threshold_mode="window", window_size=1000)
    sampler = MultiTemperatureSampler(cfg, generator=torch.Generator().manual_seed(2))
    proc = MultiTemperatureLogitsProcessor(sampler, eos_token_id=EOS)
    _, seq1 = _generate(model, proc, batch=4, new=6, seed=1)
    rec1 = proc.result(seq1)
    n1 = int(rec1.active.sum())
    assert int(sampler.window.count) == n1  # finished rows stayed out of the window
    prompt, seq2 = _generate(model, proc, batch=3, prompt_len=7, new=4, seed=2)
    rec2 = proc.result(seq2)
    assert rec2.tokens.shape == seq2[:, 7:].shape
    assert int(sampler.window.count) == n1 + int(rec2.active.sum())


def test_processor_raises_on_nan_after_generate():
    sampler = MultiTemperatureSampler(MultiTemperatureConfig(nan_check="deferred"))
    proc = MultiTemperatureLogitsProcessor(sampler)
    scores = torch.zeros(2, 10)
    scores[1, 3] = float("nan")
    proc(torch.zeros(2, 3, dtype=torch.long), scores)
    with pytest.raises(ValueError, match="NaN"):
        proc.result()
