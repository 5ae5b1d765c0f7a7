"""MultiTempGRPOTrainer: per-token temperatures from rollout to loss, on a real tiny model."""

import pytest
import torch
from trl import GRPOTrainer

from mtrl.config import grpo_config

MULTI = (
    "sampler.mode=multi",
    "sampler.threshold_mode=batch",
    "sampler.reasoning_fraction=0.5",
    "sampler.high_temperature=1.6",
    "sampler.low_temperature=0.5",
    "train.max_completion_length=10",
)


def rollout(trainer, prompts=2):
    """A generated, scored batch for `prompts` prompts, each repeated num_generations times."""
    n = trainer.num_generations
    inputs = [trainer.train_dataset[i] for i in range(prompts) for _ in range(n)]
    torch.manual_seed(0)
    return trainer._generate_and_score_completions(inputs)


def hand_logps(model, batch, temperatures):
    """log_softmax(logits_{t-1} / T_t)[token_t] for every completion token, by hand."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    p, k = batch["prompt_ids"].size(1), batch["completion_ids"].size(1)
    out = torch.zeros(input_ids.size(0), k)
    for t in range(k):  # token p+t is predicted by the logits at position p+t-1
        log_probs = torch.log_softmax(logits[:, p + t - 1] / temperatures[:, t, None], dim=-1)
        out[:, t] = log_probs.gather(1, input_ids[:, p + t, None]).squeeze(1)
    return out


def test_rollout_carries_aligned_per_token_tensors(make_trainer):
    trainer = make_trainer(*MULTI)
    batch = rollout(trainer)
    mask = batch["completion_mask"].bool()
    shape = batch["completion_ids"].shape
    for key in ("temperatures", "entropies", "is_reasoning"):
        assert batch[key].shape == shape
    temps = batch["temperatures"][mask]
    reasoning = batch["is_reasoning"][mask]
    assert torch.allclose(temps[reasoning], torch.tensor(1.6))
    assert torch.allclose(temps[~reasoning], torch.tensor(0.5))
    assert reasoning.any() and (~reasoning).any()
    hist = trainer.entropy_histogram()
    assert sum(hist["all"]) == int(mask.sum())
    assert sum(hist["reasoning"]) + sum(hist["knowledge"]) == sum(hist["all"])


@pytest.mark.parametrize("engine", ["hf", "fast"])
def test_loss_log_probs_use_each_tokens_own_temperature(make_trainer, engine, monkeypatch):
    trainer = make_trainer(*MULTI, f"rollout.engine={engine}")
    batch = rollout(trainer)
    rollout_engine = trainer._rollout_engine(trainer.model)
    assert (rollout_engine is not None) == (engine == "fast")
    if engine == "fast":  # the trainer made q/k/v and gate/up adjacent: one GEMM each
        assert len(rollout_engine._groups) == 2 * trainer.model.config.num_hidden_layers
    mask = batch["completion_mask"].bool()
    expected = hand_logps(trainer.model, batch, batch["temperatures"])
    # The scoring binding ends with the rollout: nothing is left bound on the trainer.
    assert "_get_per_token_logps_and_entropies" not in vars(trainer)

    seen = []
    real = type(trainer)._get_per_token_logps_and_entropies

    def spy(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        seen.append(out[0].detach())
        return out

    monkeypatch.setattr(type(trainer), "_get_per_token_logps_and_entropies", spy)
    # With the old log-probs set to the hand-computed ones, every ratio is exactly 1, so the
    # DAPO loss is -sum(advantage) over completion tokens / number of tokens.
    batch["old_per_token_logps"] = expected.clone()
    loss = trainer._compute_loss(trainer.model, batch)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0][mask], expected[mask], atol=1e-5, rtol=1e-5)
    advantages = batch["advantages"][:, None].expand_as(mask)
    assert advantages.abs().sum() > 0
    want = -(advantages * mask).sum() / mask.sum()
    torch.testing.assert_close(loss.detach(), want, atol=1e-5, rtol=1e-4)
    # The first completion token too, and a one-position shift would be caught.
    torch.testing.assert_close(seen[0][:, 0], expected[:, 0], atol=1e-5, rtol=1e-5)
    shifted = hand_logps(trainer.model, batch, batch["temperatures"].roll(1, dims=1))
    assert not torch.allclose(shifted[mask], expected[mask], atol=1e-3)


def test_chunked_log_softmax_path_matches_hidden_scaling(make_trainer):
    trainer = make_trainer(*MULTI)
    assert trainer.logprob_path == "hidden_scale"
    batch = rollout(trainer)
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    k = batch["completion_ids"].size(1)
    results = {}
    for path in ("hidden_scale", "chunked_log_softmax"):
        trainer.logprob_path = path
        with torch.no_grad():
            results[path] = trainer._get_per_token_logps_and_entropies(
                trainer.model,
                input_ids,
                attention_mask,
                k,
                batch_size=3,
                compute_entropy=True,
                temperatures=batch["temperatures"],
            )
    mask = batch["completion_mask"].bool()
    for i in (0, 1):  # log-probs and entropies
        torch.testing.assert_close(
            results["hidden_scale"][i][mask],
            results["chunked_log_softmax"][i][mask],
            atol=1e-5,
            rtol=1e-5,
        )


def test_single_mode_loss_equals_stock_grpo_trainer(make_trainer, smoke_config):
    ours = make_trainer("sampler.mode=single", "sampler.temperature=0.7")
    batch = rollout(ours)
    old = hand_logps(ours.model, batch, torch.ones_like(batch["temperatures"])) - 0.05
    batch["old_per_token_logps"] = old

    from mtrl.models import load_model_and_tokenizer

    cfg = smoke_config()
    losses = {}
    for temperature in (0.7, 1.0):
        model, tokenizer, _ = load_model_and_tokenizer(cfg.model, cfg.pbs)
        model.load_state_dict(ours.model.state_dict())
        args = grpo_config(cfg)
        args.temperature = temperature
        args.reward_weights = None
        stock = GRPOTrainer(
            model=model,
            reward_funcs=ours.reward_funcs,
            args=args,
            train_dataset=ours.train_dataset,
            processing_class=tokenizer,
        )
        stock_batch = {
            k: v for k, v in batch.items() if k not in ("temperatures", "entropies", "is_reasoning")
        }
        losses[temperature] = stock._compute_loss(stock.model, stock_batch).detach()
    loss = ours._compute_loss(ours.model, batch).detach()
    torch.testing.assert_close(loss, losses[0.7], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(loss, losses[1.0], atol=1e-4)


def test_rollout_offsets_shift_each_generation_of_a_group(make_trainer):
    trainer = make_trainer(
        "sampler.mode=single", "sampler.temperature=1.0", "sampler.rollout_offsets=true"
    )
    batch = rollout(trainer, prompts=2)
    mask = batch["completion_mask"].bool()
    want = [1.0, 1.0, 0.9, 1.1] * 2  # offsets 0, 0, -0.1, +0.1 within each group of 4
    for row, temperature in enumerate(want):
        assert torch.allclose(batch["temperatures"][row][mask[row]], torch.tensor(temperature))


def test_trainer_refuses_a_grpo_temperature(make_trainer, smoke_config):
    trainer = make_trainer()
    args = grpo_config(smoke_config())
    args.temperature = 0.7
    args.reward_weights = None
    with pytest.raises(ValueError, match="sampler config"):
        type(trainer)(
            model=trainer.model,
            reward_funcs=trainer.reward_funcs,
            args=args,
            train_dataset=trainer.train_dataset,
            processing_class=trainer.processing_class,
        )


@pytest.mark.parametrize("engine", ["hf", "fast"])
def test_importance_ratio_is_one_when_sampling_matches_training_and_capped_otherwise(
    make_trainer, engine
):
    trainer = make_trainer(
        *MULTI, "rollout.importance_sampling_cap=2.0", f"rollout.engine={engine}"
    )
    batch = rollout(trainer)
    mask = batch["completion_mask"].bool()
    ratio = batch["importance_sampling_ratio"]
    # fp32 cached decoding and the uncached training forward agree to rounding.
    torch.testing.assert_close(ratio[mask], torch.ones_like(ratio[mask]), atol=1e-4, rtol=0)
    assert any(trainer._metrics[m]["sampling/importance_ratio/mean"] for m in ("train", "eval"))

    # The sampling log-probs travel in TRL's own batch key, 0 after each completion's end.
    sampling = batch["sampling_per_token_logps"]
    assert (sampling[~mask] == 0).all() and (sampling[mask] < 0).any()
    lowered = {k: v for k, v in batch.items() if k != "old_per_token_logps"}
    lowered["sampling_per_token_logps"] = sampling - 1.0
    capped = trainer._importance_ratio(lowered)
    torch.testing.assert_close(capped[mask], torch.full_like(capped[mask], 2.0))
    scaled = trainer._importance_ratio({**batch, "sampling_per_token_logps": sampling + 0.5})
    torch.testing.assert_close(
        scaled[mask],
        torch.full_like(scaled[mask], float(torch.exp(torch.tensor(-0.5)))),
        atol=1e-4,
        rtol=1e-4,
    )


def test_importance_ratio_weights_the_per_token_loss(make_trainer):
    trainer = make_trainer(*MULTI)
    batch = rollout(trainer)
    mask = batch["completion_mask"].bool()
    batch["old_per_token_logps"] = hand_logps(trainer.model, batch, batch["temperatures"])
    ratio = torch.rand_like(batch["temperatures"]) * 2
    batch["importance_sampling_ratio"] = ratio
    loss = trainer._compute_loss(trainer.model, batch).detach()
    advantages = batch["advantages"][:, None] * ratio
    want = -(advantages * mask).sum() / mask.sum()  # every policy/old ratio is 1
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-4)


def test_auto_engine_uses_generate_under_zero3(make_trainer, monkeypatch):
    from accelerate import Accelerator

    trainer = make_trainer("rollout.engine=auto")
    monkeypatch.setattr(Accelerator, "device", property(lambda self: torch.device("cuda")))
    trainer._zero3 = True  # parameters re-gathered each rollout: graphs would not survive
    assert trainer._rollout_engine(trainer.model) is None
    trainer._zero3 = False
    assert trainer._rollout_engine(trainer.model) is not None  # CUDA without ZeRO-3: fast


def test_rollout_compile_keys_reach_the_engine(make_trainer, monkeypatch):
    """rollout.max_autotune and rollout.compile_prefill (CUDA only) are the engine's options."""
    from accelerate import Accelerator

    trainer = make_trainer(
        "rollout.engine=fast", "rollout.max_autotune=true", "rollout.compile_prefill=true"
    )
    engine = trainer._rollout_engine(trainer.model)
    assert engine.max_autotune and not engine.compile_prefill  # CPU: no compiled prefill
    monkeypatch.setattr(Accelerator, "device", property(lambda self: torch.device("cuda")))
    engine = trainer._rollout_engine(trainer.model)
    assert engine.max_autotune and engine.compile_prefill and engine.compile_decode


def test_scorer_timeouts_reach_the_trainer_metrics(make_trainer):
    """A completion whose sandboxed scorer times out is counted in `rewards/<name>/timeouts`."""
    from omegaconf import OmegaConf

    from mtrl import scoring
    from mtrl.config import DataConfig
    from mtrl.data import load_prompts
    from mtrl.rewards import pop_scoring_counts, reasoning_gym_reward
    from mtrl.scoring import ScoringConfig

    data = DataConfig(source="reasoning_gym", task="countdown", size=1, seed=5)
    rows = load_prompts(OmegaConf.structured(data))
    row = {k: list(rows[k]) for k in rows.column_names if k != "prompt"}

    def countdown(prompts, completions, **kwargs):
        # Every completion is scored as the hostile countdown answer below, for the row above.
        answers = ["\\boxed{9**9**9**9}"] + ["\\boxed{1}"] * (len(completions) - 1)
        return [reasoning_gym_reward([None], [a], **row)[0] for a in answers]

    scoring.configure(ScoringConfig(timeout_s=1.0, workers=1))
    pop_scoring_counts()
    try:
        trainer = make_trainer(reward_funcs=[countdown])
        rollout(trainer, prompts=1)
    finally:
        scoring.configure(ScoringConfig())
    metrics = trainer._metrics["train" if trainer.model.training else "eval"]
    assert metrics["rewards/reasoning_gym/timeouts"] == [1.0]
    assert metrics["rewards/reasoning_gym/crashes"] == [0.0]
