"""MLflow tracking: one run per experiment output folder, kept across resumes.

The callback logs the resolved config (as params and as `config.yaml`), the git commit,
every metric TRL logs, TRL's completion tables and the sampler's entropy histograms.
A tracking server that is briefly unreachable never stops training: failed calls are
queued in order and retried at the next logging step and at the end.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from mtrl.config import ExperimentConfig, flatten, to_yaml

logger = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
# MLflow's HTTP client retries for minutes by default; a training step should not wait that long.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


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


class MLflowCallback(TrainerCallback):
    """Logs one training run to MLflow from the main process.

    `output_dir` keeps the run id, so a resumed training continues the same MLflow run.
    Set `trainer` after building the trainer to log completions and entropy histograms.
    """

    def __init__(
        self, cfg: ExperimentConfig, output_dir: str, resume: bool, is_main_process: bool = True
    ):
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.resume = resume
        self.enabled = is_main_process
        self.trainer: Any = None
        self.run_id: str | None = None
        self._pending: list[tuple[str, Callable[[], None]]] = []
        self._uploaded: set[str] = set()
        self._warned = False

    # --- run lifecycle -------------------------------------------------------------------

    def start(self) -> str | None:
        """Open (or reopen, on resume) the run and log config, params and tags."""
        if not self.enabled:
            return None
        import mlflow

        mlflow.set_tracking_uri(self.cfg.tracking.uri)
        experiment = self.cfg.tracking.experiment or self.cfg.name
        run_id_file = self.output_dir / RUN_ID_FILE
        client = mlflow.MlflowClient()
        if self.resume and run_id_file.exists():
            self.run_id = run_id_file.read_text().strip()
            client.update_run(self.run_id, status="RUNNING")
            logger.info("MLflow: resuming run %s", self.run_id)
            return self.run_id
        self.run_id = create_run(
            client, self.cfg, experiment, self.cfg.tracking.run_name, {"mtrl.kind": "train"}
        )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        run_id_file.write_text(self.run_id)
        logger.info(
            "MLflow: run %s in experiment '%s' at %s",
            self.run_id,
            experiment,
            self.cfg.tracking.uri,
        )
        return self.run_id

    def _call(self, what: str, fn: Callable[[], None]) -> None:
        """Run an MLflow call, or queue it (in order) while the server is unreachable."""
        self._pending.append((what, fn))
        while self._pending:
            what, fn = self._pending[0]
            try:
                fn()
            except Exception as exc:  # network errors surface as several exception types
                if not self._warned:
                    logger.warning(
                        "MLflow unreachable (%s: %s); training continues, %d call(s) queued for retry",
                        what,
                        str(exc).splitlines()[0][:200],
                        len(self._pending),
                    )
                    self._warned = True
                return
            self._pending.pop(0)
        if self._warned:
            logger.warning("MLflow reachable again; queued calls sent")
            self._warned = False

    # --- trainer events ------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        if self.enabled and self.run_id is None:
            self.start()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.enabled or not logs:
            return
        import mlflow

        metrics = {
            _metric_name(k): float(v)
            for k, v in logs.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        step = state.global_step
        client = mlflow.MlflowClient()
        run_id = self.run_id
        entries = [mlflow.entities.Metric(k, v, _now_ms(), step) for k, v in metrics.items()]
        for i in range(0, len(entries), 1000):
            chunk = entries[i : i + 1000]
            self._call(f"metrics step {step}", lambda c=chunk: client.log_batch(run_id, metrics=c))
        self._log_completion_files(client)
        self._log_entropy_histogram(client, step)

    def on_train_end(self, args, state, control, **kwargs):
        if not self.enabled:
            return
        import mlflow

        client = mlflow.MlflowClient()
        self._log_completion_files(client)
        run_id = self.run_id
        self._call("end run", lambda: client.set_terminated(run_id, status="FINISHED"))
        if self._pending:
            logger.error(
                "MLflow still unreachable at the end of training: %d call(s) not sent",
                len(self._pending),
            )

    # --- artifacts -----------------------------------------------------------------------

    def _log_completion_files(self, client) -> None:
        """Upload the completion tables TRL writes under output_dir/completions/."""
        folder = self.output_dir / "completions"
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.parquet")):
            if path.name in self._uploaded:
                continue
            self._uploaded.add(path.name)
            self._call(
                f"artifact {path.name}",
                lambda p=str(path), r=self.run_id: client.log_artifact(r, p, "completions"),
            )

    def _log_entropy_histogram(self, client, step: int) -> None:
        every = self.cfg.sampler.entropy_histogram_every
        rollout = getattr(self.trainer, "last_rollout_stats", None)
        if rollout is None or every == 0 or step % every:
            return
        histogram = rollout.entropy_histogram()
        run_id = self.run_id
        name = f"entropy/step_{step:06d}.json"
        self._call(name, lambda: client.log_text(run_id, json.dumps(histogram), name))


def create_run(
    client, cfg: ExperimentConfig, experiment: str, run_name: str | None, tags: dict[str, str]
) -> str:
    """A new run in `experiment` holding the config (params and config.yaml) and git commit."""
    tags = {"mtrl.experiment_file": cfg.name, **tags}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run = client.create_run(_experiment_id(client, experiment), run_name=run_name, tags=tags)
    run_id = run.info.run_id
    items = [(k, _param_value(v)) for k, v in flatten(cfg).items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params a call
        client.log_batch(run_id, params=[_param(k, v) for k, v in items[i : i + 100]])
    client.log_text(run_id, to_yaml(cfg), "config.yaml")
    return run_id


def _experiment_id(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    return client.create_experiment(name)


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key, value)


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text[:6000]  # MLflow's limit for a param value


def _metric_name(key: str) -> str:
    # MLflow metric names allow letters, digits, _ - . / and spaces; TRL uses some others.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
