"""bench/rollout.py on the CPU: the weight+KV read floor against hand arithmetic, and the table
of a real tiny run (tiny Qwen2 model, the real engine and generate); the --profile notes also
on a GPU (marked)."""

import re
from pathlib import Path

import pytest
import torch
from script_loader import load_script
from transformers import Qwen2Config

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
COLUMNS = (
    "| method | batch | new tokens | ms/step | floor W | floor W+KV | x W floor | x W+KV floor "
    "| tokens/s | notes |"
)


@pytest.fixture(scope="module")
def rollout():
    """bench/rollout.py as a module (it imports its neighbours report and shapes)."""
    return load_script(BENCH / "rollout.py", "bench_rollout", search=BENCH)


def test_kv_shape_of_configs(rollout):
    """2 (K, V) x layers x KV heads x head dim x bytes; head dim = hidden / attention heads."""
    tiny = rollout.KVShape.of(Qwen2Config(**rollout.TINY), torch.float32)
    assert (tiny.layers, tiny.kv_heads, tiny.head_dim, tiny.bytes_per_value) == (2, 2, 8, 4)
    assert tiny.bytes_per_position == 256  # 2 * 2 * 2 * 8 * 4
    qwen = rollout.KVShape.of(Qwen2Config(**rollout.QWEN25_15B), torch.bfloat16)
    assert qwen.bytes_per_position == 28_672  # 2 * 28 layers * 2 KV heads * 128 * 2 B


def test_step_floor_by_hand(rollout):
    kv = rollout.KVShape(layers=2, kv_heads=2, head_dim=8, bytes_per_value=4)  # 256 B/position
    # Batch 4, prompt 8, 16 new tokens: steps read 8, 9, ..., 23 positions per row, 248 in all.
    # KV: 256 B * 248 * 4 rows = 253,952 B over 16 steps = 15,872 B a step. At 1e9 B/s:
    # weights 1e6 B -> 1 ms; weights + KV -> 1,015,872 B -> 1.015872 ms.
    w, wkv = rollout.step_floor_ms(1_000_000, kv, 4, 8, 16, 1e9)
    assert w == pytest.approx(1.0)
    assert wkv == pytest.approx(1.015872)
    # One new token reads the prompt only: 256 B * 8 * 4 = 8,192 B.
    assert rollout.step_floor_ms(1_000_000, kv, 4, 8, 1, 1e9)[1] == pytest.approx(1.008192)
    with pytest.raises(ValueError, match="new_tokens"):
        rollout.step_floor_ms(1_000_000, kv, 4, 8, 0, 1e9)


def test_bench_rows_and_table(rollout, tmp_path):
    """A tiny run of the main rows: parameter bytes by hand, each row's floor, the table."""
    out = tmp_path / "rollout.md"
    args = rollout.parse_args(
        ["--tiny", "--device", "cpu", "--cases", "2x4,3x8", "--reps", "1", "--out", str(out)]
    )
    bench = rollout.Bench(args)
    # Tiny Qwen2 (tied head): embedding 1000 x 32 = 32,000; per layer q 32x32+32, k and v
    # 32x16+16 each, o 32x32, gate/up/down 3 x 2,048, 2 norms x 32 = 9,344; 2 layers; final norm
    # 32. 50,720 float32 parameters = 202,880 B: the tied LM head counted once, not missing.
    assert bench.param_bytes == 202_880
    bench.main_rows()
    assert [(r["method"], r["batch"], r["new"]) for r in bench.rows] == [
        ("engine", 2, 4),
        ("engine, single temperature", 2, 4),
        ("engine, fused norms", 2, 4),
        ("engine, torch sampler", 2, 4),
        ("engine", 3, 8),
        ("engine, single temperature", 3, 8),
    ]
    # The fused variant's kernels ran (here through Triton's interpreter), and its row says so.
    fused = [r for r in bench.rows if r["method"] == "engine, fused norms"]
    assert all("2 decoder layers decode with fused add+RMSNorm" in r["note"] for r in fused)
    # On the CPU every sampler takes the torch path (fused kernels are the CUDA default).
    assert all(r["note"].endswith("sampler: torch") for r in bench.rows)
    for r in bench.rows:
        positions = sum(8 + t for t in range(r["new"]))  # prompt length 8 with --tiny
        kv_step = 256 * positions * r["batch"] / r["new"]
        assert r["floor_w"] == pytest.approx(202_880 / bench.bw * 1e3)
        assert r["floor_kv"] == pytest.approx((202_880 + kv_step) / bench.bw * 1e3)
        assert r["ms"] > 0
    assert set(bench.overhead) == {(2, 4), (3, 8)}

    text = bench.write_table()
    assert out.read_text() == text
    lines = text.splitlines()
    assert COLUMNS in lines
    assert "256 B per position and row" in text
    rows = [line for line in lines if line.startswith("| engine")]
    assert len(rows) == 6
    for line, r in zip(rows, bench.rows, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == COLUMNS.count("|") - 1
        assert cells[5] == f"{r['floor_kv']:.4g}"
        assert cells[6] == f"{r['ms'] / r['floor_w']:.2f}"
        assert cells[7] == f"{r['ms'] / r['floor_kv']:.2f}"


def test_main_row_selection_and_skipped_generate(rollout, tmp_path):
    """--rows picks the groups; generate past --hf-max-new gets a 'not run' row, no times."""
    out = tmp_path / "rollout.md"
    text = rollout.main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--rows",
            "hf,eager",
            "--cases",
            "2x4,2x8",
            "--hf-tokens",
            "2",
            "--hf-max-new",
            "4",
            "--out",
            str(out),
        ]
    )
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    methods = [line.split("|")[1].strip() for line in rows[1:]]
    assert methods == ["engine-eager", "hf-dynamic", "hf-dynamic", "hf-static", "hf-static"]
    skipped = [line for line in rows if "not run (8 new tokens > --hf-max-new 4)" in line]
    assert len(skipped) == 2
    assert all("| - | - | - | - | - | - |" in line for line in skipped)
    with pytest.raises(ValueError, match="--rows"):
        rollout.parse_args(["--rows", "main,bogus"])
    # --no-comparisons: main's first case without the fused-norms and torch-sampler engines
    args = rollout.parse_args(
        ["--tiny", "--device", "cpu", "--cases", "2x4", "--reps", "1", "--no-comparisons"]
        + ["--out", str(tmp_path / "main.md")]
    )
    bench = rollout.Bench(args)
    bench.main_rows()
    assert [r["method"] for r in bench.rows] == ["engine", "engine, single temperature"]


def test_recompile_limit_hits_are_named_in_the_row_of_the_engine(rollout, tmp_path, monkeypatch):
    """A function that dynamo stops compiling during an engine's first call is named in that
    engine's row, not in the next one's (the hit is warned about once)."""
    args = rollout.parse_args(
        ["--tiny", "--device", "cpu", "--cases", "2x4", "--reps", "1", "--no-comparisons"]
        + ["--out", str(tmp_path / "rollout.md")]
    )
    bench = rollout.Bench(args)

    def doubled(x):
        return x * 2

    compiled = torch.compile(doubled, dynamic=False, backend="eager")
    generate = rollout.RolloutEngine.generate

    def generate_past_a_limit(self, *a, **kw):
        with torch._dynamo.config.patch(recompile_limit=1):
            for n in (2, 3):  # a second shape is a second compile: past the limit of 1
                compiled(torch.ones(n))
        return generate(self, *a, **kw)

    monkeypatch.setattr(rollout.RolloutEngine, "generate", generate_past_a_limit)
    bench.main_rows()
    notes = [r["note"] for r in bench.rows]
    assert "RECOMPILE LIMIT HIT, uncompiled: doubled" in notes[0]
    assert "RECOMPILE LIMIT" not in notes[1]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_profile_notes_at_the_first_case(rollout, tmp_path, device):
    """--profile adds a kernel count and kernel time a step to the first case's main rows
    (from a trace of one more generate on CUDA; on the CPU the note says it needs CUDA)."""
    kernels = tmp_path / "kernels.md"
    args = rollout.parse_args(
        ["--tiny", "--device", device, "--cases", "2x4,3x8", "--reps", "1", "--profile"]
        + ["--out", str(tmp_path / "rollout.md"), "--kernels", str(kernels)]
    )
    bench = rollout.Bench(args)
    bench.main_rows()
    first = [r for r in bench.rows if (r["batch"], r["new"]) == (2, 4)]
    later = [r for r in bench.rows if (r["batch"], r["new"]) == (3, 8)]
    assert len(first) == 4 and len(later) == 2
    assert not any("profile:" in r["note"] for r in later)
    for r in first:
        if device == "cpu":
            assert "profile: CUDA only" in r["note"]
        else:
            match = re.search(
                r"profile: (\d+) kernels, ([\d.]+) ms of kernel time a step", r["note"]
            )
            assert match and int(match[1]) > 10 and float(match[2]) > 0, r["note"]
    if device == "cpu":
        assert not kernels.exists()
    else:  # the first engine's kernels: their calls a step add up to its note's count
        calls = [float(line.split("|")[3]) for line in kernels.read_text().splitlines()[4:]]
        count = re.search(r"profile: (\d+) kernels", first[0]["note"])[1]
        assert abs(sum(calls) - int(count)) <= 1


def test_kernel_table(rollout, tmp_path):
    """Kernels grouped by name, per decode step, most time first."""
    from types import SimpleNamespace as K

    args = rollout.parse_args(["--tiny", "--cases", "2x4", "--kernels", str(tmp_path / "k.md")])
    bench = rollout.Bench(args)
    events = [K(name="gemm", device_time=30.0), K(name="norm", device_time=5.0)] * 4
    events += [K(name="attn", device_time=20.0)] * 4
    bench.write_kernel_table(events, n_new=4)
    rows = [line.split("|")[1:5] for line in (tmp_path / "k.md").read_text().splitlines()[4:]]
    assert [[c.strip() for c in r] for r in rows] == [
        ["30.00", "54.5%", "1.00", "`gemm`"],
        ["20.00", "36.4%", "1.00", "`attn`"],
        ["5.00", "9.1%", "1.00", "`norm`"],
    ]
