"""bench/pbs_backward.py on the CPU (--tiny, Triton's interpreter): the script a device call
runs, end to end, so a broken column costs no device time."""

import math
from pathlib import Path

from script_loader import run_interpreted

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_run_writes_the_table_with_gradients_checked(tmp_path):
    """One length: a row with every column, PBS's gradients within 1e-2 of autograd through
    the reference, the flex columns empty (no CPU backward), and the header naming the commit
    and the command."""
    out = tmp_path / "pbs_backward.md"
    run_interpreted(
        ROOT / "bench" / "pbs_backward.py",
        "--tiny", "--lengths", "96", "--commit", "abc1234", "--out", str(out), cwd=ROOT,
    )  # fmt: skip
    text = out.read_text()
    assert "- commit: abc1234" in text and "--lengths 96" in text

    lines = [line for line in text.splitlines() if line.startswith("|")]
    columns = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(columns, (c.strip() for c in r.strip("|").split("|")), strict=True))
            for r in lines[2:]]  # fmt: skip
    assert len(rows) == 1
    row = rows[0]
    assert row["N"] == "96" and 0.0 < float(row["density"]) <= 1.0
    assert float(row["max rel. err. vs reference"]) < 1e-2
    assert all(float(row[name]) > 0 for name in ("dense", "PBS total", "PBS attn"))
    for name in ("flex total", "flex attn", "flex / PBS total", "flex / PBS attn"):
        assert math.isnan(float(row[name])), name
    assert row["dense ran"] == "math (CPU)"
