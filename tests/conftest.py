"""Test settings: two CPU cores, no model hub, kernels through Triton's interpreter on CPU."""

import os

# Before torch or any hub client is imported by a test module.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
if not torch.cuda.is_available():
    # Our Triton kernels run on the CPU through the interpreter; the variable is read when a
    # kernel is defined, so it must be set before any test module imports one.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SMOKE = os.path.join(ROOT, "experiments", "smoke.yaml")


def text_length(completions, **kwargs):
    """A reward that varies across a tiny random model's completions, so advantages are not 0."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [len(t) / 100 for t in texts]


@pytest.fixture
def smoke_config(tmp_path):
    """`smoke_config(*overrides)`: the smoke experiment writing into tmp_path."""
    from mtrl.config import load_config

    def make(*overrides):
        return load_config(
            SMOKE,
            [
                f"train.output_dir={tmp_path / 'out'}",
                f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                *overrides,
            ],
        )

    return make


@pytest.fixture
def make_trainer(smoke_config):
    """`make_trainer(*overrides, reward_funcs=[text_length])`: a tiny in-process trainer, built
    from the smoke config as `mtrl.run.build_trainer` builds it, with the test's rewards and
    callbacks instead of the config's rewards, MLflow and evaluation."""
    from omegaconf import OmegaConf

    from mtrl.config import grpo_config
    from mtrl.data import load_prompts
    from mtrl.models import load_model_and_tokenizer
    from mtrl.trainer import MultiTempGRPOTrainer

    def make(*overrides, reward_funcs=(text_length,), callbacks=()):
        cfg = smoke_config(*overrides)
        model, tokenizer, peft = load_model_and_tokenizer(cfg.model, cfg.pbs)
        args = grpo_config(cfg)
        args.reward_weights = None  # the config's weights are for its own rewards
        return MultiTempGRPOTrainer(
            model=model,
            reward_funcs=list(reward_funcs),
            args=args,
            train_dataset=load_prompts(cfg.data, tokenizer),
            processing_class=tokenizer,
            peft_config=peft,
            callbacks=list(callbacks),
            sampler_config=OmegaConf.to_object(cfg.sampler),
            rollout_config=OmegaConf.to_object(cfg.rollout),
            dynamic_sampling_config=OmegaConf.to_object(cfg.dynamic_sampling),
        )

    return make
