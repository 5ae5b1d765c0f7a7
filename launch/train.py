"""Train one experiment: `accelerate launch launch/train.py experiments/aime.yaml [key=value ...]`.

Also runs under plain `python`. A bad config ends with exit status 2 and one line naming the
key path, before any model or dataset is loaded. Ctrl-C ends the MLflow run as KILLED, prints
one line naming the last checkpoint and exits with status 130. A finished run ends with a few
lines (`mtrl.summary`): the run's name and id, the reward at its first and last step, the
tracking store and the command that browses it.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.accelerator.is_available():
    # Without an accelerator DeepSpeed (imported by accelerate/TRL when the trainer is built)
    # falls back to its CPU accelerator and warns "Setting accelerator to CPU. If you have GPU
    # ..." at import: noise at the top of every CPU run (`make demo`). Naming the accelerator
    # it would pick anyway silences it; a value the user set is kept. Before any import that
    # may load DeepSpeed.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled

from mtrl.cli import exit_with, parse_experiment  # noqa: E402
from mtrl.config import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _, cfg = parse_experiment(parser, argv)
    try:
        return run(cfg)
    except KeyboardInterrupt as exc:
        # Ctrl-C: one line instead of a traceback; 130 is the shell's status for SIGINT. During
        # training, the exception is mtrl.tracking.RunInterrupted, its text that line.
        if type(exc) is KeyboardInterrupt:
            print("interrupted before training started", file=sys.stderr)
        elif exc.is_main_process:
            print(exc, file=sys.stderr)
        return 130
    finally:
        # A process group left for the interpreter's exit can abort it (a gloo thread made to
        # exit inside a destructor: SIGABRT, "terminate called without an active exception"),
        # so that a finished multi-process run exits -6 instead of 0. Destroying it frees it only
        # when nothing else holds it: see mtrl.config._import_deepspeed_comm_before_the_process_group.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run(cfg) -> int:
    from mtrl.data import DataError
    from mtrl.run import train

    try:
        trainer = train(cfg)
    except (ConfigError, DataError) as exc:
        exit_with(exc)
    if trainer.args.process_index == 0:  # once per run, not once per process
        print_summary(trainer, cfg.tracking.uri)
    return 0


def print_summary(trainer, tracking_uri: str) -> None:
    """Print `mtrl.summary` of the finished run; an MLflow store unreachable by now costs the
    summary only (one line on stderr), never the run's exit status."""
    from mtrl.summary import summary
    from mtrl.tracking import MLflowCallback

    trackers = [c for c in trainer.callback_handler.callbacks if isinstance(c, MLflowCallback)]
    run_id = trackers[0].run_id if trackers else None
    try:
        text = summary(trainer, tracking_uri, run_id)
    except Exception as exc:  # MLflow's network errors surface as several exception types
        print(f"no run summary: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
        return
    print(text)


if __name__ == "__main__":
    sys.exit(main())
