"""The closing lines of a training run: what ran, how the reward moved, where to look.

from mtrl.summary import summary
print(summary(trainer, tracking_uri=cfg.tracking.uri, run_id=tracker.run_id))

run 'demo' (id 3f2c...) finished 3 steps
reward: 0.412 at step 1 -> 0.538 at step 3
tracking store: sqlite:////work/main/mlflow.db
browse it:  mlflow ui --backend-store-uri sqlite:////work/main/mlflow.db
"""

from __future__ import annotations

import os
from typing import Any


def summary(trainer: Any, tracking_uri: str, run_id: str | None) -> str:
    """A few lines for the end of `launch/train.py`: run name and id, the reward at the first
    and last logged step, the tracking store and the command that browses it.

    `trainer` is a finished transformers Trainer (its `state.log_history` holds TRL's
    `reward`); `run_id` the MLflow run of the training (None: not tracked, e.g. not the main
    process). The run name is read back from the store.
    """
    uri = absolute_uri(tracking_uri)
    lines = []
    if run_id:
        import mlflow

        name = mlflow.MlflowClient(uri).get_run(run_id).info.run_name
        lines.append(f"run '{name}' (id {run_id}) finished {trainer.state.global_step} steps")
    else:
        lines.append(f"training finished {trainer.state.global_step} steps (no MLflow run)")
    rewards = [(h["step"], h["reward"]) for h in trainer.state.log_history if "reward" in h]
    if rewards:
        (first_step, first), (last_step, last) = rewards[0], rewards[-1]
        lines.append(f"reward: {first:.3f} at step {first_step} -> {last:.3f} at step {last_step}")
    lines.append(f"tracking store: {uri}")
    if uri.startswith(("http://", "https://")):
        lines.append(f"browse it:  open {uri} in a browser")
    else:
        lines.append(f"browse it:  mlflow ui --backend-store-uri {uri}")
    return "\n".join(lines)


def absolute_uri(uri: str) -> str:
    """A local store's URI with an absolute path (`sqlite:///mlflow.db` is relative to the
    working directory, so a printed command must not depend on where it is run from)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    if "://" not in uri:  # a plain folder (file store)
        return os.path.abspath(uri)
    return uri
