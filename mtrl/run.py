"""From a validated config to a finished, tracked training run."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from omegaconf import OmegaConf
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from mtrl.config import ConfigError, ExperimentConfig, grpo_config

logger = logging.getLogger(__name__)


def resume_checkpoint(cfg: ExperimentConfig, output_dir: str) -> str | None:
    """The checkpoint `train.resume` asks for: true = the latest in output_dir, or a path."""
    resume = cfg.train.get("resume", False)
    if resume is False:
        return None
    if resume is True:
        latest = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if latest is None:
            logger.warning(
                "train.resume: no checkpoint in %s yet; starting from step 0", output_dir
            )
        return latest
    if not os.path.isdir(resume):
        raise ConfigError(f"train.resume: checkpoint folder not found: {resume}")
    return resume


def build_trainer(cfg: ExperimentConfig, resume: bool = False) -> Any:
    """Load model, data and rewards; return a ready MultiTempGRPOTrainer with MLflow attached."""
    from mtrl.data import load_prompts_with_stats
    from mtrl.eval import EvalCallback
    from mtrl.models import load_model_and_tokenizer, load_tokenizer
    from mtrl.rewards import build_reward_funcs
    from mtrl.scoring import configure as configure_scoring
    from mtrl.tracking import MLflowCallback
    from mtrl.trainer import MultiTempGRPOTrainer

    args = grpo_config(cfg)  # before any loading: its errors are config errors
    # Rewards score the policy's text in sandboxed worker processes with these limits.
    configure_scoring(OmegaConf.to_object(cfg.scoring))
    # The data is read and checked before the weights load: a bad row costs seconds, not minutes.
    tokenizer = load_tokenizer(cfg.model)
    dataset, data_stats = load_prompts_with_stats(cfg.data, tokenizer)
    logger.info(
        "data: %d prompts from %s (%d bad rows skipped, %d of them over data.max_prompt_tokens)",
        data_stats.rows_kept,
        data_stats.source,
        data_stats.rows_skipped,
        data_stats.rows_too_long,
    )
    model, tokenizer, peft_config = load_model_and_tokenizer(cfg.model, cfg.pbs, tokenizer)
    reward_funcs, _ = build_reward_funcs(
        cfg.rewards, cfg.reward_options, args.max_completion_length
    )
    tracker = MLflowCallback(
        cfg, args.output_dir, resume=resume, is_main_process=args.process_index == 0
    )
    trainer = MultiTempGRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[tracker],
        sampler_config=OmegaConf.to_object(cfg.sampler),
        rollout_config=OmegaConf.to_object(cfg.rollout),
        dynamic_sampling_config=OmegaConf.to_object(cfg.dynamic_sampling),
    )
    tracker.trainer = trainer
    if cfg.eval.every_n_steps and cfg.eval.benchmarks:
        trainer.add_callback(EvalCallback(cfg, trainer))
    return trainer


class CtrlC(TrainerCallback):
    """A Ctrl-C that cannot be lost. SIGINT raises KeyboardInterrupt as usual and is also
    remembered: one raised where Python swallows it (inside a `__del__` or a weakref callback,
    printed as "Exception ignored") is raised again at the end of the step."""

    def __init__(self) -> None:
        self.pending = False

    def handler(self, signum: int, frame: Any) -> None:
        self.pending = True
        raise KeyboardInterrupt

    def on_step_end(self, args, state, control, **kwargs):
        if self.pending:
            raise KeyboardInterrupt


def train(cfg: ExperimentConfig) -> Any:
    """Train to `train.max_steps`, resuming when asked; returns the trainer."""
    output_dir = grpo_config(cfg).output_dir
    checkpoint = resume_checkpoint(cfg, output_dir)
    trainer = build_trainer(cfg, resume=checkpoint is not None)
    ctrl_c = CtrlC()
    trainer.add_callback(ctrl_c)
    main_thread = threading.current_thread() is threading.main_thread()  # signals need it
    previous = signal.signal(signal.SIGINT, ctrl_c.handler) if main_thread else None
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except KeyboardInterrupt:
        # Ctrl-C: the checkpoints on disk are complete (each one is staged, then renamed); end
        # the MLflow run as KILLED and say where to resume from.
        from transformers import ProgressCallback

        from mtrl.tracking import MLflowCallback, RunInterrupted

        step = trainer.state.global_step
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, MLflowCallback):
                callback.end("KILLED", step)
            elif isinstance(callback, ProgressCallback) and callback.training_bar is not None:
                callback.training_bar.close()  # its last line before ours, not after
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        raise RunInterrupted(step, last, trainer.args.process_index == 0) from None
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    trainer.save_model(output_dir)
    return trainer
