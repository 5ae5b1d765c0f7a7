"""End-to-end GRPO training on the tiny model: parameters, LoRA, MLflow, crash and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from mtrl.run import train

ROOT = Path(__file__).resolve().parent.parent


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_training_changes_parameters(make_trainer):
    trainer = make_trainer("train.max_steps=2", "train.save_steps=100")
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(changed) > len(before) // 2


def test_lora_changes_only_adapter_weights(make_trainer):
    trainer = make_trainer(
        "model.lora.enabled=true", "model.lora.r=4", "train.max_steps=2", "train.save_steps=100"
    )
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    adapters = {n for n in before if "lora_" in n}
    assert adapters and changed
    assert changed <= adapters, sorted(changed - adapters)[:5]
    assert all(
        not p.requires_grad for n, p in trainer.model.named_parameters() if n not in adapters
    )


def test_pipeline_logs_the_run_to_mlflow(smoke_config, tmp_path):
    cfg = smoke_config("sampler.entropy_histogram_every=1", "tracking.run_name=smoke-test")
    train(cfg)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    client = mlflow.MlflowClient()
    (run,) = mlflow.search_runs(experiment_names=["smoke"], output_format="list")
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "smoke-test"
    params = run.data.params
    assert params["model.name"] == "tiny"
    assert params["train.max_steps"] == "3"
    assert params["sampler.high_temperature"] == "1.2"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    assert run.data.tags["mlflow.source.git.commit"] == commit.stdout.strip()
    for key in (
        "loss",
        "reward",
        "sampler/reasoning_share",
        "sampler/threshold",
        "sampler/reasoning/temperature_mean",
    ):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == [1, 2, 3], key
    config_file = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert yaml.safe_load(Path(config_file).read_text())["train"]["max_steps"] == 3
    completions = [a.path for a in client.list_artifacts(run.info.run_id, "completions")]
    assert len(completions) == 3
    histograms = [a.path for a in client.list_artifacts(run.info.run_id, "entropy")]
    assert len(histograms) == 3
    hist = json.loads(
        Path(client.download_artifacts(run.info.run_id, histograms[0], str(tmp_path))).read_text()
    )
    assert sum(hist["reasoning"]) + sum(hist["knowledge"]) == sum(hist["all"]) > 0


def run_train(tmp_path, *overrides, **kwargs):
    command = [
        sys.executable,
        str(ROOT / "launch" / "train.py"),
        str(ROOT / "experiments" / "smoke.yaml"),
        f"train.output_dir={tmp_path / 'out'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "train.max_steps=6",
        "train.save_steps=2",
        "train.save_total_limit=2",
        "tracking.log_completions=false",
        *overrides,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


@pytest.mark.slow
def test_resume_after_sigkill_ends_at_the_configured_step(tmp_path):
    out = tmp_path / "out"
    proc = run_train(tmp_path, "train.max_completion_length=24")
    deadline = time.time() + 240
    while not (out / "checkpoint-2").exists():  # killed right after its first complete checkpoint
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoint-6").exists()
    for checkpoint in out.glob("checkpoint-*"):  # complete, never half-written
        assert (checkpoint / "trainer_state.json").exists()
        assert (checkpoint / "model.safetensors").exists()
    run_id = (out / "mlflow_run_id").read_text()

    resumed = run_train(tmp_path, "train.max_completion_length=24", "train.resume=true")
    log = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    new_id = (out / "mlflow_run_id").read_text()

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    if new_id != run_id:  # the kill came after a step past the checkpoint was logged
        assert client.get_run(new_id).data.tags["mtrl.resumed_from"] == run_id
        assert client.get_run(run_id).info.status == "KILLED"
    assert client.get_run(new_id).info.status == "FINISHED"
    steps = Counter(m.step for m in client.get_metric_history(new_id, "loss"))
    assert steps == Counter(range(1, 7))  # every step logged exactly once
