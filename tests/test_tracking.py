"""MLflow tracking against a real tracking server that goes away mid-run and comes back."""

import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest
from transformers import TrainerState

from mtrl.tracking import MLflowCallback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp_path, port):
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination", str(tmp_path / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            assert proc.poll() is None, "mlflow server exited"
            time.sleep(0.3)
    proc.kill()
    pytest.fail("mlflow server did not start in 90 s")


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_metrics_survive_a_server_outage(smoke_config, tmp_path, caplog):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cfg = smoke_config(f"tracking.uri={uri}")
    server = start_server(tmp_path, port)
    callback = MLflowCallback(cfg, str(tmp_path / "out"), resume=False)
    try:
        run_id = callback.start()
        state = TrainerState()
        for step in (1, 2, 3, 4):
            if step == 2:
                stop_server(server)
            if step == 4:
                server = start_server(tmp_path, port)
            state.global_step = step
            callback.on_log(None, state, None, logs={"loss": 0.5 / step, "reward": float(step)})
            if step == 3:
                assert callback._pending, "calls made while the server is down are queued"
        callback.on_train_end(None, state, None)
        assert not callback._pending
        assert "MLflow unreachable" in caplog.text

        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient()
        history = client.get_metric_history(run_id, "reward")
        assert [(m.step, m.value) for m in history] == [(s, float(s)) for s in (1, 2, 3, 4)]
        assert client.get_run(run_id).info.status == "FINISHED"
        assert client.get_run(run_id).data.params["model.name"] == "tiny"
    finally:
        stop_server(server)
