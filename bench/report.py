"""What the benchmark tables' headers share."""

from __future__ import annotations

import datetime
import subprocess
import sys


def git_commit(explicit: str | None = None) -> str:
    """``explicit`` if given (``--commit``), else the short hash of HEAD, else "unknown"."""
    if explicit is not None:
        return explicit
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:  # noqa: BLE001 - not a git checkout, or no git: still write the table
        return "unknown"


def header(title: str, card: str, commit: str) -> list[str]:
    """The lines every table starts with: title, card, date, commit and this exact command."""
    return [
        f"# {title}",
        "",
        f"- card: {card}",
        f"- date: {datetime.date.today().isoformat()}",
        f"- commit: {commit}",
        f"- command: `python {' '.join(sys.argv)}`",
    ]
