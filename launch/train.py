"""Train one experiment: `accelerate launch launch/train.py experiments/aime.yaml [key=value ...]`.

Also runs under plain `python`. A bad config ends with exit status 2 and one line naming the
key path, before any model or dataset is loaded.
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

    from mtrl.data import DataError
    from mtrl.run import train

    try:
        train(cfg)
    except (ConfigError, DataError) as exc:
        exit_with(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
