"""mtrl.summary: the closing lines of a run, against a real MLflow store."""

import os
from types import SimpleNamespace

import mlflow
from transformers import TrainerState

from mtrl.summary import absolute_uri, summary


def test_summary_names_the_run_rewards_store_and_ui_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = "sqlite:///mlflow.db"  # relative: the printed command must not depend on the cwd
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("demo"), run_name="demo-run")
    state = TrainerState(global_step=3)
    state.log_history = [
        {"step": 1, "reward": 0.25, "loss": 0.1},
        {"step": 2, "loss": 0.2},
        {"step": 3, "reward": 0.5},
    ]
    text = summary(SimpleNamespace(state=state), uri, run.info.run_id)
    store = f"sqlite:///{os.path.join(str(tmp_path), 'mlflow.db')}"
    assert f"run 'demo-run' (id {run.info.run_id}) finished 3 steps" in text
    assert "reward: 0.250 at step 1 -> 0.500 at step 3" in text
    assert f"mlflow ui --backend-store-uri {store}" in text
    assert "finished 3 steps (no MLflow run)" in summary(SimpleNamespace(state=state), uri, None)


def test_absolute_uri_keeps_servers_and_absolute_paths():
    assert absolute_uri("http://host:5000") == "http://host:5000"
    assert absolute_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert absolute_uri("mlruns") == os.path.abspath("mlruns")
