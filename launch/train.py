"""Train one experiment: `accelerate launch launch/train.py experiments/aime.yaml [key=value ...]`.

Also runs under plain `python`. A bad config ends with exit status 2 and one line naming the
key path, before any model or dataset is loaded. Ctrl-C ends the MLflow run as KILLED, prints
one line naming the last checkpoint and exits with status 130.
"""

import argparse
import sys
from pathlib import Path

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


def run(cfg) -> int:
    from mtrl.data import DataError
    from mtrl.run import train

    try:
        train(cfg)
    except (ConfigError, DataError) as exc:
        exit_with(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
