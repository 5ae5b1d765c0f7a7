"""What the benchmark tables' headers share."""

from __future__ import annotations

import datetime
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit(explicit: str | None = None, watch: tuple[str, ...] = ()) -> str:
    """``explicit`` if given (``--commit``), else the short hash of HEAD, else "unknown".

    With ``watch`` paths, "+dirty" is appended when any of them has uncommitted changes, so a
    table never names a commit whose code it did not measure.
    """
    if explicit is not None:
        return explicit

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = bool(watch) and bool(git("status", "--porcelain", "--", *watch))
    except Exception:  # noqa: BLE001 - not a git checkout, or no git: still write the table
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def copy_bandwidth(device=None, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy of ``nbytes``, read + write counted (median of 10).

    CUDA copies are timed with events; other devices with the host clock.
    """
    import torch

    device = torch.device(device or "cuda")
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


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
