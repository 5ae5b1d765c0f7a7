"""MLflow tracking: one run per experiment output folder, kept across resumes.

The callback logs the resolved config (as params and as `config.yaml`), the git commit,
every metric TRL logs, TRL's completion tables and the sampler's entropy histograms.

Tracking never stops training. Every MLflow call, opening the run included, goes through one
ordered queue: a call that fails (a server down at the start or mid-run) stays queued with all
calls after it, and the queue is retried at every logging step and at the end. A server that
comes up late thus gets the run, its params, config.yaml and every metric, in order, once.
A Ctrl-C that lands during those calls is held until they are done, so the run still ends
KILLED.

Resuming (`train.resume`): output_dir records the run id and its store (RUN_ID_FILE,
RUN_URI_FILE), and the resumed training goes on in that run when it holds nothing logged after
the checkpoint's step. A kill between logging step s and saving its checkpoint leaves metrics of
a lost trajectory in the run, and MLflow cannot delete metric values; the run is then continued
in a new run holding a copy of the old one up to the checkpoint (params, tags, artifacts, metric
history), tagged `mtrl.resumed_from`, while the old run gets `mtrl.continued_in` and ends KILLED.
So every step of a run is logged exactly once. Resuming into another store starts a new run
there, tagged with the old run and store.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from mtrl.config import ExperimentConfig, flatten, to_yaml

logger = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
RUN_URI_FILE = "mlflow_tracking_uri"  # the store of RUN_ID_FILE's run
RESUMED_FROM = "mtrl.resumed_from"  # on a run that continues another one: that run's id
RESUMED_FROM_STORE = "mtrl.resumed_from_store"
CONTINUED_IN = "mtrl.continued_in"  # on a run continued by another one: that run's id
NOTE = "mlflow.note.content"  # the run's description in the MLflow UI
# Artifacts named after a training step (entropy/step_000003.json, completions_00003.parquet).
STEP_FILE = re.compile(r"^(?:step|completions)_(\d+)\.(?:json|parquet)$")
# MLflow's HTTP client retries for minutes by default; a training step should not wait that long.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

# A queued MLflow call; it may return follow-up calls, which run next, before the rest.
Call = Callable[[], "list[tuple[str, Call]] | None"]


class RunInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C after `step` optimizer steps; the run was ended KILLED."""

    def __init__(self, step: int, checkpoint: str | None, is_main_process: bool = True):
        super().__init__(step, checkpoint)
        self.step = step
        self.checkpoint = checkpoint
        self.is_main_process = is_main_process

    def __str__(self) -> str:
        if self.checkpoint is None:
            return f"interrupted at step {self.step}; no checkpoint saved yet"
        return (
            f"interrupted at step {self.step}; last checkpoint: {self.checkpoint}; "
            "resume with train.resume=true"
        )


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


# --- stores ------------------------------------------------------------------------------


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///path` URI (relative to the working directory)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?")[0]
    return None if path in ("", ":memory:") else Path(path).resolve()


def store_uri(uri: str) -> str:
    """`uri` with a relative sqlite path made absolute: one name per store, from any folder."""
    path = _sqlite_path(uri)
    if path is None:
        return uri
    query = uri.partition("?")[2]
    return f"sqlite:///{path}" + (f"?{query}" if query else "")


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on a sqlite store's `<file>.lock` (other stores: no lock).

    MLflow creates a new sqlite store's tables unguarded; two processes doing it at once crash
    (`table _alembic_tmp_experiments already exists`).
    """
    path = _sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_client(uri: str):
    """An `mlflow.MlflowClient` for `uri`; a new sqlite store is created by one process at a time."""
    import mlflow

    with store_lock(uri):
        return mlflow.MlflowClient(uri)


def create_run(
    client, cfg: ExperimentConfig, experiment: str, run_name: str | None, tags: dict[str, str]
) -> str:
    """A new run in `experiment` holding the config (params and config.yaml) and git commit."""
    run_id = _new_run(client, cfg, experiment, run_name, tags)
    for _, call in _config_calls(client, run_id, cfg):
        call()
    return run_id


def _new_run(
    client, cfg: ExperimentConfig, experiment: str, run_name: str | None, tags: dict[str, str]
) -> str:
    tags = {"mtrl.experiment_file": cfg.name, **tags}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run = client.create_run(_experiment_id(client, experiment), run_name=run_name, tags=tags)
    return run.info.run_id


def _config_calls(client, run_id: str, cfg: ExperimentConfig) -> list[tuple[str, Call]]:
    """The calls logging `cfg` to a run: params (MLflow takes 100 a call), then config.yaml."""
    items = [(k, _param_value(v)) for k, v in flatten(cfg).items()]
    return [
        *_param_calls(client, run_id, items),
        ("config.yaml", lambda: client.log_text(run_id, to_yaml(cfg), "config.yaml")),
    ]


def _param_calls(client, run_id: str, items: list[tuple[str, str]]) -> list[tuple[str, Call]]:
    from mlflow.entities import Param

    return [
        (
            f"params {i}",
            lambda c=items[i : i + 100]: client.log_batch(run_id, params=[Param(*p) for p in c]),
        )
        for i in range(0, len(items), 100)
    ]


def _experiment_id(client, name: str) -> str:
    """Get or create; a process that loses the creation race to another one gets the winner's."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


# --- the callback ------------------------------------------------------------------------


@contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that comes during MLflow calls until they are done, then deliver
    it. Raised inside a call, KeyboardInterrupt can leave a sqlite store's write lock held (every
    later call, ending the run KILLED included, then fails with "database is locked") or leave a
    call that was sent queued, to be sent twice. Python runs signal handlers in the main thread
    only, so elsewhere there is nothing to hold (nor where C code set the handler: Python could
    not put it back)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is None
    ):
        yield
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            signal.raise_signal(signal.SIGINT)  # to the handler that was there


class MLflowCallback(TrainerCallback):
    """Logs one training run to MLflow from the main process.

    `output_dir` keeps the run id, so a resumed training continues the same MLflow run (or a
    copy of it, see the module's docstring). Set `trainer` after building the trainer to log
    entropy histograms.
    """

    def __init__(
        self, cfg: ExperimentConfig, output_dir: str, resume: bool, is_main_process: bool = True
    ):
        self.cfg = cfg
        self.uri = store_uri(cfg.tracking.uri)
        self.experiment = cfg.tracking.experiment or cfg.name
        self.output_dir = Path(output_dir)
        self.resume = resume
        self.enabled = is_main_process
        self.trainer: Any = None
        self.run_id: str | None = None  # None until the store has been reached
        self._client = None
        self._started = False
        self._pending: list[tuple[str, Call]] = []
        self._uploaded: dict[str, int] = {}  # completion file -> mtime (ns) when uploaded
        self._warned = False

    @property
    def client(self):
        if self._client is None:
            self._client = open_client(self.uri)
        return self._client

    # --- run lifecycle -------------------------------------------------------------------

    def start(self, step: int = 0) -> str | None:
        """Open the run for training that starts after optimizer step `step` (0, or the resumed
        checkpoint's). Queued like every call: returns the run id, or None while the store is
        unreachable.
        """
        if not self.enabled or self._started:
            return self.run_id
        import mlflow

        self._started = True
        mlflow.set_tracking_uri(self.uri)
        self._call("open run", lambda: self._open(step))
        return self.run_id

    def end(self, status: str, step: int) -> None:
        """Send what is queued and end the run with `status` (FINISHED, KILLED, FAILED)."""
        if not self.enabled or not self._started:
            return
        self._log_completion_files(step)
        self._call(f"end run {status}", lambda: self.client.set_terminated(self.run_id, status))
        if self._pending:
            logger.error(
                "MLflow still unreachable at the end of training: %d call(s) not sent",
                len(self._pending),
            )

    def _open(self, step: int) -> list[tuple[str, Call]]:
        previous = self._previous_run() if self.resume else None
        if previous is None:
            return self._fresh_run({"mtrl.kind": "train"})
        old_id, old_uri = previous
        if old_uri != self.uri:
            note = (
                f"Resumes run {old_id} of store {old_uri} at step {step} (its checkpoint); "
                f"the history up to step {step} is in that run."
            )
            tags = {RESUMED_FROM: old_id, RESUMED_FROM_STORE: old_uri, NOTE: note}
            follow_ups = self._fresh_run({"mtrl.kind": "train", **tags})
            return [*follow_ups, ("note in the old run", lambda: self._note_moved(old_id, old_uri))]
        run = self._get_run(old_id)
        if run is None:
            note = f"Resumes run {old_id} at step {step}; that run is not in this store."
            return self._fresh_run({"mtrl.kind": "train", RESUMED_FROM: old_id, NOTE: note})
        last = max((m.step for m in run.data.to_proto().metrics), default=0)
        if last > step:
            return self._continue(run, step, last)
        self.client.update_run(old_id, status="RUNNING")
        self.run_id = old_id
        logger.info("MLflow: resuming run %s at step %d", old_id, step)
        self._record()  # output dirs of older versions lack the store file
        return None

    def _fresh_run(self, tags: dict[str, str]) -> list[tuple[str, Call]]:
        self.run_id = _new_run(
            self.client, self.cfg, self.experiment, self.cfg.tracking.run_name, tags
        )
        logger.info(
            "MLflow: run %s in experiment '%s' at %s", self.run_id, self.experiment, self.uri
        )
        return [*_config_calls(self.client, self.run_id, self.cfg), ("run id", self._record)]

    def _continue(self, old, step: int, last: int) -> list[tuple[str, Call]]:
        """Continue run `old` (which logged up to `last`) from `step` in a new run."""
        client, old_id = self.client, old.info.run_id
        note = (
            f"Continues run {old_id} from its checkpoint at step {step}. That run also logged "
            f"steps {step + 1}-{last} of training lost in a crash; its history up to step "
            f"{step} is copied here."
        )
        own = {"mlflow.runName", NOTE, RESUMED_FROM, RESUMED_FROM_STORE, CONTINUED_IN}
        tags = {k: v for k, v in old.data.tags.items() if k not in own}
        run = client.create_run(
            old.info.experiment_id,
            run_name=old.info.run_name,
            tags={**tags, RESUMED_FROM: old_id, NOTE: note},
        )
        new_id = self.run_id = run.info.run_id
        logger.warning(
            "MLflow: run %s holds steps %d-%d logged after its last checkpoint (step %d); "
            "resuming in run %s, a copy of it up to step %d",
            old_id, step + 1, last, step, new_id, step,
        )  # fmt: skip
        old_note = (
            f"Continued in run {new_id} from step {step} (the checkpoint); this run's steps "
            f"{step + 1}-{last} come from training lost in a crash."
        )

        def close_old() -> None:
            client.set_tag(old_id, CONTINUED_IN, new_id)
            client.set_tag(old_id, NOTE, old_note)
            if client.get_run(old_id).info.status == "RUNNING":
                client.set_terminated(old_id, "KILLED")

        return [
            *_param_calls(client, new_id, list(old.data.params.items())),
            ("copy artifacts", lambda: _copy_artifacts(client, old_id, new_id, step)),
            *[
                (f"copy metric {key}", lambda k=key: _copy_history(client, old_id, new_id, k, step))
                for key in sorted(old.data.metrics)
            ],
            ("end the old run", close_old),
            ("run id", self._record),
        ]

    def _note_moved(self, old_id: str, old_uri: str) -> None:
        """Point the run in the old store to the new one, if that store can be reached now."""
        try:
            if (path := _sqlite_path(old_uri)) is not None and not path.exists():
                raise FileNotFoundError(path)
            client = open_client(old_uri)
            client.set_tag(old_id, CONTINUED_IN, f"{self.run_id} in {self.uri}")
            client.set_tag(old_id, NOTE, f"Continued in run {self.run_id} of store {self.uri}.")
            if client.get_run(old_id).info.status == "RUNNING":
                client.set_terminated(old_id, "KILLED")
        except Exception as exc:  # the old store is gone or unreachable: only the note is lost
            logger.warning(
                "MLflow: could not note the move in run %s at %s (%s)",
                old_id,
                old_uri,
                str(exc).splitlines()[0][:200],
            )

    def _previous_run(self) -> tuple[str, str] | None:
        """(run id, store) recorded in output_dir; output dirs of older versions lack the store."""
        id_file, uri_file = self.output_dir / RUN_ID_FILE, self.output_dir / RUN_URI_FILE
        if not id_file.exists():
            return None
        uri = uri_file.read_text().strip() if uri_file.exists() else self.uri
        return id_file.read_text().strip(), uri

    def _get_run(self, run_id: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def _record(self) -> None:
        """Write the run id and store to output_dir, once the run holds its config and history."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / RUN_ID_FILE).write_text(self.run_id)
        (self.output_dir / RUN_URI_FILE).write_text(self.uri)

    def _call(self, what: str, fn: Call) -> None:
        """Queue an MLflow call, then send the queue in order until a call fails.

        A call the store rejects (an HTTP 4xx, e.g. an invalid value) is dropped with an error,
        so it cannot block the calls after it; any other failure is taken as the store being
        unreachable and retried later.
        """
        from mlflow.exceptions import MlflowException

        self._pending.append((what, fn))
        with _ctrl_c_held():
            while self._pending:
                what, fn = self._pending[0]
                try:
                    follow_ups = fn()
                except MlflowException as exc:
                    if not 400 <= exc.get_http_status_code() < 500:
                        return self._unreachable(what, exc)
                    logger.error("MLflow rejected %s: %s", what, str(exc).splitlines()[0][:300])
                    follow_ups = None
                except Exception as exc:  # network errors surface as several exception types
                    return self._unreachable(what, exc)
                self._pending[:1] = follow_ups or []
        if self._warned:
            logger.warning("MLflow reachable again; queued calls sent")
            self._warned = False

    def _unreachable(self, what: str, exc: Exception) -> None:
        if not self._warned:
            logger.warning(
                "MLflow unreachable (%s: %s); training continues, %d call(s) queued for retry",
                what,
                str(exc).splitlines()[0][:200],
                len(self._pending),
            )
            self._warned = True

    # --- trainer events ------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        # state.global_step is the resumed checkpoint's step here: the trainer loaded it.
        self.start(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.enabled or not logs:
            return
        from mlflow.entities import Metric

        step = state.global_step
        now = int(time.time() * 1000)
        entries = [
            Metric(_metric_name(k), float(v), now, step)
            for k, v in logs.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        for i in range(0, len(entries), 1000):
            self._call(
                f"metrics step {step}",
                lambda c=entries[i : i + 1000]: self.client.log_batch(self.run_id, metrics=c),
            )
        self._log_completion_files(step)
        self._log_entropy_histogram(step)

    def on_train_end(self, args, state, control, **kwargs):
        self.end("FINISHED", state.global_step)

    # --- artifacts -----------------------------------------------------------------------

    def _log_completion_files(self, step: int) -> None:
        """Upload the completion tables TRL writes under output_dir/completions/.

        After a resume, files past `step` are those of the lost trajectory until training
        rewrites them: they wait, and a rewritten file is uploaded again.
        """
        folder = self.output_dir / "completions"
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.parquet")):
            if (match := STEP_FILE.match(path.name)) and int(match[1]) > step:
                continue
            mtime = path.stat().st_mtime_ns
            if self._uploaded.get(path.name) == mtime:
                continue
            self._uploaded[path.name] = mtime
            self._call(
                f"artifact {path.name}",
                lambda p=str(path): self.client.log_artifact(self.run_id, p, "completions"),
            )

    def _log_entropy_histogram(self, step: int) -> None:
        """Every `sampler.entropy_histogram_every` steps: the trainer's histogram of its last
        rollout's token entropies (`entropy_histogram()`), as entropy/step_<step>.json."""
        every = self.cfg.sampler.entropy_histogram_every
        if self.trainer is None or every == 0 or step % every:
            return
        histogram = self.trainer.entropy_histogram()
        if histogram is None:  # no rollout yet
            return
        text = json.dumps(histogram)
        name = f"entropy/step_{step:06d}.json"
        self._call(name, lambda: self.client.log_text(self.run_id, text, name))


def _copy_history(client, old_id: str, new_id: str, key: str, step: int) -> None:
    """Copy metric `key`'s values at steps <= `step` from run `old_id` to run `new_id`."""
    history = [m for m in client.get_metric_history(old_id, key) if m.step <= step]
    for i in range(0, len(history), 1000):
        client.log_batch(new_id, metrics=history[i : i + 1000])


def _copy_artifacts(client, old_id: str, new_id: str, step: int) -> None:
    """Copy the artifacts of steps <= `step` (and those of no step) from run `old_id` to `new_id`.

    Completion tables are left out: they are uploaded again from output_dir/completions/.
    """

    def files(path: str | None = None) -> Iterator[str]:
        for info in client.list_artifacts(old_id, path):
            if info.is_dir:
                if info.path != "completions":
                    yield from files(info.path)
            elif not (m := STEP_FILE.match(Path(info.path).name)) or int(m[1]) <= step:
                yield info.path

    with tempfile.TemporaryDirectory() as tmp:
        for path in files():
            folder = str(Path(path).parent)
            local = client.download_artifacts(old_id, path, tmp)
            client.log_artifact(new_id, local, None if folder == "." else folder)


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text[:6000]  # MLflow's limit for a param value


def _metric_name(key: str) -> str:
    # MLflow metric names allow letters, digits, _ - . / and spaces; TRL uses some others.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)
