"""launch/eval.py against a tracking server that does not answer: one line, before any loading."""

import os
import time
from pathlib import Path

from free_port import free_port
from script_loader import load_script

import mtrl.models

ROOT = Path(__file__).resolve().parent.parent


def test_dead_tracking_server_fails_fast_before_evaluating(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loaded before the tracking server was checked")

    for name in ["load_model_and_tokenizer", "load_model", "load_tokenizer"]:
        monkeypatch.setattr(mtrl.models, name, refuse)
    for key in ["MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"]:
        if key in os.environ:  # the check caps them for its process; restored after the test
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)
    port = free_port()  # nothing listens on it
    launcher = load_script(ROOT / "launch" / "eval.py", "launch_eval")
    argv = [
        str(ROOT / "experiments" / "smoke.yaml"),
        f"tracking.uri=http://127.0.0.1:{port}",
        f"eval.benchmarks=[{{source: {tmp_path / 'bench.jsonl'}}}]",
    ]
    started = time.monotonic()
    assert launcher.main(argv) == 2
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(
        f"error: tracking.uri: no MLflow server answers at http://127.0.0.1:{port}"
    )
