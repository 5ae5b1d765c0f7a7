"""What the benchmark tables' headers share."""

from __future__ import annotations

import subprocess


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
