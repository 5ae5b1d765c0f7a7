"""bench/grpo_step.py on the CPU: a real tiny GRPO step, dense and PBS (Triton's interpreter),
split by phase into the table; and the phase timer's bookkeeping."""

import re
import time
from pathlib import Path

import pytest
import torch
from script_loader import load_script, run_interpreted

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PHASES = [
    "rollout prefill",
    "rollout decode",
    "log-prob forwards",
    "rewards + batch",
    "forward+backward",
    "optimizer step",
    "other",
]


@pytest.fixture(scope="module")
def grpo_step():
    """bench/grpo_step.py as a module (it imports its neighbours report and shapes)."""
    return load_script(BENCH / "grpo_step.py", "bench_grpo_step", search=BENCH)


def test_phases_count_their_own_time(grpo_step):
    """Nested phases: each counts its own time only, so the phases add up to the outer wall."""
    phases = grpo_step.Phases(torch.device("cpu"))
    start = time.perf_counter()
    with phases("outer"):
        time.sleep(0.02)
        with phases("inner"):
            time.sleep(0.03)
            with phases("inner"):  # re-entrant: not counted twice
                time.sleep(0.01)
        phases.begin("callback")
        time.sleep(0.01)
        phases.end("callback")
    wall = time.perf_counter() - start
    taken = phases.take()
    assert set(taken) == {"outer", "inner", "callback"}
    seconds = {name: s for name, (s, _) in taken.items()}
    assert seconds["inner"] == pytest.approx(0.04, abs=0.015)
    assert seconds["outer"] == pytest.approx(0.02, abs=0.015)
    assert sum(seconds.values()) == pytest.approx(wall, abs=0.005)
    assert phases.take() == {}  # taken: starts afresh
    with pytest.raises(RuntimeError, match="ended inside"):
        phases.begin("a")
        phases.begin("b")
        phases.end("a")


def table_rows(text: str, title: str) -> dict[str, dict[str, str]]:
    """{row label: {column: cell}} of the markdown table after the line starting with `title`."""
    lines = text[text.index(title) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| attention"))
    columns = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(columns, cells, strict=True))
    return rows


def test_dense_and_pbs_step_by_phase_on_cpu(tmp_path):
    """The script end to end: a tiny model, 150-token prompts (two of PBS's 128-token query
    blocks, off the grid), dense and PBS rows with every phase timed (> 0) and adding up to
    the step, PBS's density, the header."""
    out = tmp_path / "grpo_step.md"
    run_interpreted(
        BENCH / "grpo_step.py",
        "--tiny", "--prompt-len", "150", "--attn", "both", "--steps", "1", "--warmup", "0",
        "--out", str(out), "--work", str(tmp_path / "work"), "--commit", "abc1234",
        "train.per_device_train_batch_size=2", "train.num_generations=2",
        "train.max_completion_length=3", "pbs.min_seq_len=0", cwd=ROOT,
    )  # fmt: skip
    text = out.read_text()
    assert "- card: cpu" in text and "- commit: abc1234" in text
    assert "`python " in text and "--attn both" in text
    assert "prompts of 150 random tokens" in text

    seconds = table_rows(text, "Seconds per step")
    assert list(seconds) == ["dense", "pbs"]
    for label, row in seconds.items():
        times = [float(row[p]) for p in PHASES]
        assert all(t > 0 for t in times), (label, row)
        assert sum(times) == pytest.approx(float(row["step"]), abs=0.01)
    assert seconds["dense"]["PBS density"] == "-"
    assert 0.0 < float(seconds["pbs"]["PBS density"]) <= 1.0

    memory = table_rows(text, "Peak allocated memory")
    assert list(memory) == ["dense", "pbs"]
    assert all(set(PHASES) <= set(row) for row in memory.values())
    assert re.search(r"\| pbs \|( - \|){7}", text)  # no CUDA: not measured
    assert "What the full run costs" not in text  # only with --config


def test_recipe_cost_is_one_gpu_of_the_run(grpo_step):
    """--config aime.yaml --gpus 8: the measured process generates its 512 of the 4096
    completions (64 micro-batches of 8, 4 updates); 1600 updates at the measured seconds."""
    args = grpo_step.parse_args(
        ["--config", str(ROOT / "experiments" / "aime.yaml"), "--gpus", "8"]
    )
    cfg = grpo_step.load(args, "pbs")
    assert cfg.model.attn_implementation == "pbs" and cfg.rollout.engine == "fast"
    from mtrl.config import grpo_config

    grpo = grpo_config(cfg)
    assert (grpo.generation_batch_size, grpo.steps_per_generation) == (512, 64)
    assert grpo.gradient_accumulation_steps == 16 and cfg.train.max_steps == 1600
    seconds = dict.fromkeys((k for k, _ in grpo_step.PHASES), 1.0)
    seconds.update(prefill=10.0, decode=50.0, train=36.0)  # 100 s per generation batch
    result = grpo_step.Result(
        "pbs", seconds, dict.fromkeys(seconds, 40 * grpo_step.GIB), None, None, 1, "bfloat16"
    )
    lines = grpo_step.cost_lines(cfg, grpo, [result], 8, 80 * grpo_step.GIB)
    # 25 s per update x 1600 = 11.1 h on 8 GPUs = 89 GPU-hours; one more round of rollout,
    # log-probs and rewards (10 + 50 + 1 + 1 = 62 s) per generation batch: 400 x 62 s x 8.
    row = next(line for line in lines if line.startswith("| pbs"))
    assert row == "| pbs | 25.00 | 11.1 | 8 x 11.1 | 89 | 55 | 40.0 of 80 GiB |"
    with pytest.raises(SystemExit):
        grpo_step.load(grpo_step.parse_args(["--config", args.config, "--gpus", "3"]), None)
