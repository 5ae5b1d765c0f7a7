"""What the launchers share: CONFIG [section.key=value ...] [--print-config], and exit 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from mtrl.config import ConfigError, ExperimentConfig, load_config, to_yaml


def parse_experiment(
    parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> tuple[argparse.Namespace, ExperimentConfig]:
    """Add the experiment arguments to `parser`, parse `argv`, load and validate the config.

    A bad config exits with status 2 and one line; `--print-config` prints it and exits 0.
    """
    parser.add_argument("config", help="experiment YAML file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        exit_with(exc)
    if args.print_config:
        print(to_yaml(cfg), end="")
        sys.exit(0)
    return args, cfg


def exit_with(error: Exception) -> NoReturn:
    """End a launcher on a user error (config, data): one line, exit status 2."""
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
