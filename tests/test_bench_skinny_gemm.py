"""bench/skinny_gemm.py: its shapes and sweep by hand, and a --tiny run end to end (CPU through
Triton's interpreter, or a GPU when there is one)."""

from pathlib import Path

import pytest
from script_loader import load_script

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


@pytest.fixture(scope="module")
def bench():
    """bench/skinny_gemm.py as a module (it imports its neighbours report and shapes)."""
    return load_script(BENCH / "skinny_gemm.py", "bench_skinny_gemm", search=BENCH)


def test_qwen_projection_shapes(bench):
    """(N, K, bias, residual) of Qwen2.5-1.5B's decode GEMMs, q/k/v and gate/up fused."""
    shapes = bench.projection_shapes(bench.QWEN25_15B)
    assert {s: shapes[s] for s in bench.DEFAULT_SHAPES.split(",")} == {
        "qkv": (2048, 1536, True, False),
        "o_proj": (1536, 1536, False, False),
        "gate_up": (17920, 1536, False, False),
        "down": (1536, 8960, False, False),
        "lm_head": (151936, 1536, False, False),
    }
    assert shapes["down+res"] == (1536, 8960, False, True)


def test_sweep_configs(bench):
    """Tile stage: splits only up to the K tiles and 16 programs per SM, pipelines that fit
    shared memory; the tuning stage varies warps, stages, swap_ab and BLOCK_K of one tile."""
    configs = bench.tile_configs(64, 1536, 1536, 132)
    assert len(set(configs)) == len(configs)
    for c in configs:
        assert c.block_m == 64 and c.num_warps == 4 and c.num_stages == 3
        tiles = 1536 // c.block_n
        assert c.split_k <= 1536 // c.block_k
        assert c.split_k == 1 or tiles * c.split_k <= 16 * 132
        assert bench.fits(c)
    assert {c.split_k for c in configs} == {1, 2, 4, 8, 16}
    assert {c.block_m for c in bench.tile_configs(256, 2048, 1536, 132)} == {64, 128}
    base = configs[0]  # n16 k64: every pipeline fits
    tuned = bench.tuning_configs(base)
    assert {(c.num_warps, c.num_stages, c.swap_ab) for c in tuned} >= {(4, 3, False), (8, 5, True)}
    assert {(c.block_m, c.block_n, c.split_k) for c in tuned} == {
        (base.block_m, base.block_n, base.split_k)
    }
    assert {c.block_k for c in tuned} == {base.block_k // 2, base.block_k, base.block_k * 2}


def test_tiny_run_writes_the_table(bench, tmp_path):
    out = tmp_path / "skinny.md"
    argv = ["--tiny", "--shapes", "qkv,down+res", "--reps", "1", "--rep", "2", "--top", "2"]
    text = bench.main([*argv, "--out", str(out), "--commit", "abc1234"])
    assert out.read_text() == text
    assert text.startswith("# Skinny GEMM benchmark")
    assert "- commit: abc1234" in text and "- command: `python " in text
    rows = [line for line in text.splitlines() if line.startswith("| qkv") or "| down+res" in line]
    main_rows = [r for r in rows if r.count("|") > 10]
    assert [r.split("|")[1].strip() for r in main_rows] == ["qkv (bias)", "down+res"]
    for row in main_rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:4] in (["3", "64", "32"], ["3", "32", "64"])  # M, N, K of the tiny model
        assert float(cells[5]) > 0 and float(cells[8]) > 0 and float(cells[11]) > 0  # us
        assert float(cells[14]) < 1e-2  # err
        assert "WRONG" not in row and "failed" not in row
    assert "## Sweep" in text
