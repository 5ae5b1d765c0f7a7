"""MLflow tracking never stops training: real stores, a real tracking server, real processes.

- a server that goes away mid-run, or is down when training starts, gets every call later;
- two runs started together on a new sqlite store;
- resuming: the same run when nothing was logged past the checkpoint, a copy up to the
  checkpoint when something was (SIGKILL between a logged step and its checkpoint), a new run
  when the store changed;
- Ctrl-C ends the run KILLED with one line and exit status 130.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections import Counter
from pathlib import Path

import mlflow
import pytest
from free_port import free_port
from transformers import TrainerCallback, TrainerState

from mtrl.tracking import (
    CONTINUED_IN,
    NOTE,
    RESUMED_FROM,
    RUN_ID_FILE,
    MLflowCallback,
    store_uri,
)

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "experiments" / "smoke.yaml"


def launch_server(tmp_path, port) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination", str(tmp_path / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def wait_healthy(proc, port) -> None:
    deadline = time.time() + 180  # the server imports for a while on two busy cores
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return
        except OSError:
            assert proc.poll() is None, "mlflow server exited"
            time.sleep(0.3)
    proc.kill()
    pytest.fail("mlflow server did not start in 180 s")


def start_server(tmp_path, port) -> subprocess.Popen:
    proc = launch_server(tmp_path, port)
    wait_healthy(proc, port)
    return proc


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def step_counts(client, run_id: str, key: str) -> Counter:
    return Counter(m.step for m in client.get_metric_history(run_id, key))


def log_steps(callback: MLflowCallback, steps, state=None) -> TrainerState:
    state = state or TrainerState()
    for step in steps:
        state.global_step = step
        callback.on_log(None, state, None, logs={"loss": 0.5 / step, "reward": float(step)})
    return state


# --- a server that is unreachable for a while -------------------------------------------


@pytest.mark.slow
def test_metrics_survive_a_server_outage(smoke_config, tmp_path, caplog):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cfg = smoke_config(f"tracking.uri={uri}")
    server = start_server(tmp_path, port)
    callback = MLflowCallback(cfg, str(tmp_path / "out"), resume=False)
    try:
        run_id = callback.start()
        assert run_id is not None
        state = TrainerState()
        for step in (1, 2, 3, 4):
            if step == 2:
                stop_server(server)
            if step == 4:
                server = start_server(tmp_path, port)
            log_steps(callback, [step], state)
            if step == 3:
                assert callback._pending, "calls made while the server is down are queued"
        callback.on_train_end(None, state, None)
        assert not callback._pending
        assert "MLflow unreachable" in caplog.text

        client = mlflow.MlflowClient(uri)
        history = client.get_metric_history(run_id, "reward")
        assert [(m.step, m.value) for m in history] == [(s, float(s)) for s in (1, 2, 3, 4)]
        assert client.get_run(run_id).info.status == "FINISHED"
        assert client.get_run(run_id).data.params["model.name"] == "tiny"
    finally:
        stop_server(server)


class ServerLater(TrainerCallback):
    """Launches the tracking server after step 1 and waits for it to answer at step 3."""

    def __init__(self, tmp_path, port):
        self.tmp_path, self.port, self.server = tmp_path, port, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.server = launch_server(self.tmp_path, self.port)
        if state.global_step == 3:
            wait_healthy(self.server, self.port)


@pytest.mark.slow
def test_training_starts_while_the_server_is_down(smoke_config, tmp_path, caplog):
    from mtrl.run import build_trainer

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cfg = smoke_config(
        f"tracking.uri={uri}", "train.max_steps=4", "train.save_steps=100", "tracking.run_name=late"
    )
    trainer = build_trainer(cfg)
    later = ServerLater(tmp_path, port)
    trainer.add_callback(later)
    try:
        trainer.train()  # the server is down at the start: the run is opened at step 3
        (tracker,) = [
            c for c in trainer.callback_handler.callbacks if isinstance(c, MLflowCallback)
        ]
        assert "MLflow unreachable (open run" in caplog.text
        assert not tracker._pending
        client = mlflow.MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
        assert run.info.run_id == tracker.run_id == (tmp_path / "out" / RUN_ID_FILE).read_text()
        assert run.info.status == "FINISHED" and run.info.run_name == "late"
        assert run.data.params["train.max_steps"] == "4"
        assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert len(client.list_artifacts(run.info.run_id, "completions")) == 4
        for key in ("loss", "reward", "sampler/reasoning_share"):
            assert step_counts(client, run.info.run_id, key) == Counter([1, 2, 3, 4]), key
    finally:
        if later.server is not None:
            stop_server(later.server)


# --- concurrent first use of a sqlite store ---------------------------------------------

RUN_ONE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from transformers import TrainerState
    from mtrl.config import load_config
    from mtrl.tracking import MLflowCallback

    smoke, uri, out, ready, go = sys.argv[1:]
    cfg = load_config(smoke, [f"tracking.uri={uri}"])
    callback = MLflowCallback(cfg, out, resume=False)
    Path(ready).touch()
    while not Path(go).exists():  # both processes open the new store at the same moment
        time.sleep(0.001)
    callback.start()
    state = TrainerState()
    for step in (1, 2):
        state.global_step = step
        callback.on_log(None, state, None, logs={"loss": 1.0 / step})
    callback.on_train_end(None, state, None)
    assert not callback._pending, callback._pending
    print("run", callback.run_id)
    """
)


@pytest.mark.slow
def test_two_runs_start_together_on_a_new_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    script = tmp_path / "run_one.py"
    script.write_text(RUN_ONE)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(SMOKE),
                uri,
                str(tmp_path / f"out{i}"),
                str(tmp_path / f"ready{i}"),
                str(go),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
        assert time.time() < deadline
        time.sleep(0.05)
    go.touch()
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "MLflow unreachable" not in "".join(logs)
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert len(runs) == 2
    for run in runs:
        assert run.info.status == "FINISHED"
        assert step_counts(client, run.info.run_id, "loss") == Counter([1, 2])


# --- resuming ---------------------------------------------------------------------------


def test_resume_keeps_the_run_when_nothing_was_logged_after_the_checkpoint(smoke_config, tmp_path):
    cfg = smoke_config()
    first = MLflowCallback(cfg, str(tmp_path / "out"), resume=False)
    run_id = first.start()
    log_steps(first, [1, 2])  # then killed, with checkpoint-2 on disk
    resumed = MLflowCallback(cfg, str(tmp_path / "out"), resume=True)
    assert resumed.start(2) == run_id
    state = log_steps(resumed, [3, 4])
    resumed.on_train_end(None, state, None)
    client = mlflow.MlflowClient(cfg.tracking.uri)
    assert step_counts(client, run_id, "loss") == Counter([1, 2, 3, 4])
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1


def test_resume_into_another_store_starts_a_run_there(smoke_config, tmp_path):
    old_cfg = smoke_config()
    first = MLflowCallback(old_cfg, str(tmp_path / "out"), resume=False)
    old_id = first.start()
    log_steps(first, [1, 2])  # then killed
    new_uri = f"sqlite:///{tmp_path / 'other' / 'new.db'}"
    resumed = MLflowCallback(smoke_config(f"tracking.uri={new_uri}"), str(tmp_path / "out"), True)
    new_id = resumed.start(2)
    state = log_steps(resumed, [3])
    resumed.on_train_end(None, state, None)

    new_run = mlflow.MlflowClient(new_uri).get_run(new_id)
    assert new_id != old_id and new_run.info.status == "FINISHED"
    assert new_run.data.tags[RESUMED_FROM] == old_id
    old_store = store_uri(old_cfg.tracking.uri)
    assert old_id in new_run.data.tags[NOTE] and old_store in new_run.data.tags[NOTE]
    assert new_run.data.params["model.name"] == "tiny"
    assert (tmp_path / "out" / RUN_ID_FILE).read_text() == new_id

    old_run = mlflow.MlflowClient(old_cfg.tracking.uri).get_run(old_id)
    assert new_id in old_run.data.tags[CONTINUED_IN] and new_id in old_run.data.tags[NOTE]
    assert old_run.info.status == "KILLED"


def train_command(tmp_path, *overrides) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "launch" / "train.py"),
        str(SMOKE),
        f"train.output_dir={tmp_path / 'out'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "train.save_steps=2",
        *overrides,
    ]


KILLED_AFTER_LOGGING = textwrap.dedent(
    """
    import os, signal, sys
    from transformers import TrainerCallback
    from mtrl.config import load_config
    from mtrl.run import build_trainer

    class KillAfterLogging(TrainerCallback):  # runs after the MLflow callback's on_log
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGKILL)

    trainer = build_trainer(load_config(sys.argv[1], sys.argv[2:]))
    trainer.add_callback(KillAfterLogging())
    trainer.train()
    """
)


@pytest.mark.slow
def test_resume_after_a_kill_between_a_logged_step_and_its_checkpoint(tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(KILLED_AFTER_LOGGING)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    overrides = ["train.max_steps=5", "sampler.entropy_histogram_every=1"]
    killed = subprocess.run(
        [sys.executable, str(script), *train_command(tmp_path, *overrides)[2:]],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    old_id = (out / RUN_ID_FILE).read_text()
    assert step_counts(client, old_id, "loss") == Counter([1, 2, 3])  # step 3: no checkpoint

    resumed = subprocess.run(
        train_command(tmp_path, *overrides, "train.resume=true"),
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    new_id = (out / RUN_ID_FILE).read_text()
    assert new_id != old_id
    new_run, old_run = client.get_run(new_id), client.get_run(old_id)
    for key in ("loss", "reward", "sampler/reasoning_share"):
        assert step_counts(client, new_id, key) == Counter([1, 2, 3, 4, 5]), key
    old_loss = {m.step: m.value for m in client.get_metric_history(old_id, "loss")}
    new_loss = {m.step: m.value for m in client.get_metric_history(new_id, "loss")}
    assert [new_loss[s] for s in (1, 2)] == [old_loss[s] for s in (1, 2)]  # copied
    assert new_run.info.status == "FINISHED" and new_run.data.tags[RESUMED_FROM] == old_id
    assert new_run.data.params == old_run.data.params
    assert (
        new_run.data.tags["mlflow.source.git.commit"]
        == old_run.data.tags["mlflow.source.git.commit"]
    )
    assert "config.yaml" in {a.path for a in client.list_artifacts(new_id)}
    histograms = [a.path for a in client.list_artifacts(new_id, "entropy")]
    assert histograms == [f"entropy/step_{s:06d}.json" for s in range(1, 6)]
    assert len(client.list_artifacts(new_id, "completions")) == 5
    assert old_run.info.status == "KILLED" and old_run.data.tags[CONTINUED_IN] == new_id
    assert new_id in old_run.data.tags[NOTE] and old_id in new_run.data.tags[NOTE]


# --- Ctrl-C -----------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_ends_the_run_killed_with_one_line(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        train_command(tmp_path, "train.max_steps=200", "tracking.log_completions=false"),
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while not (out / "checkpoint-2").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and "train.resume=true" in last, stderr[-3000:]
    assert sum(line.startswith("interrupted") for line in stderr.splitlines()) == 1
    step = int(last.split()[3].rstrip(";"))
    assert step >= 2
    checkpoint = Path(last.split("last checkpoint: ")[1].split(";")[0])
    # the latest complete one: at step - step % 2, or 2 before if Ctrl-C came while saving that
    assert checkpoint.parent == out and step - step % 2 - int(checkpoint.name[11:]) in (0, 2)
    AutoModelForCausalLM.from_pretrained(checkpoint)  # complete and loadable

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run((out / RUN_ID_FILE).read_text())
    assert run.info.status == "KILLED"
    assert step - max(step_counts(client, run.info.run_id, "loss")) in (0, 1)  # logged or not


def test_ctrl_c_inside_an_mlflow_call_waits_for_the_call(smoke_config, tmp_path):
    """A Ctrl-C that lands in the middle of a call to a sqlite store is held until the queue is
    sent: the call completes once (not re-sent), and the run can still be ended KILLED."""
    callback = MLflowCallback(smoke_config(), str(tmp_path / "out"), resume=False)
    run_id = callback.start()

    def interrupted_call():
        callback.client.log_metric(run_id, "before", 1.0, step=1)
        os.kill(os.getpid(), signal.SIGINT)
        callback.client.log_metric(run_id, "after", 2.0, step=1)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            callback._call("two metrics", interrupted_call)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert callback._pending == []
    callback.end("KILLED", 1)
    client = mlflow.MlflowClient(callback.uri)
    assert step_counts(client, run_id, "before") == Counter([1])
    assert step_counts(client, run_id, "after") == Counter([1])
    assert client.get_run(run_id).info.status == "KILLED"


def test_a_swallowed_ctrl_c_stops_the_run_at_the_step_end():
    from mtrl.run import CtrlC

    ctrl_c = CtrlC()
    ctrl_c.on_step_end(None, None, None)  # nothing pending: training goes on
    try:  # where Python swallows it: a __del__ or weakref callback
        ctrl_c.handler(signal.SIGINT, None)
    except KeyboardInterrupt:
        pass
    with pytest.raises(KeyboardInterrupt):
        ctrl_c.on_step_end(None, None, None)
