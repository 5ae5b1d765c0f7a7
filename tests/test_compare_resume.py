"""launch/compare.py counts a training resumed in a continuation run once: the pair is made by
mtrl.tracking's own callback (crash after logging past the checkpoint, resume) in a real
file-based MLflow store."""

from pathlib import Path
from types import SimpleNamespace

from script_loader import load_script

from mtrl.config import load_config
from mtrl.tracking import CONTINUED_IN, RESUMED_FROM, MLflowCallback

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4  # train.max_steps: the final evaluation is due at this step


def load_compare():
    return load_script(ROOT / "launch" / "compare.py", "compare")


def log(tracker: MLflowCallback, step: int, reward: float, final: float) -> None:
    """What training logs at `step`: GRPO's reward, and the held-out evaluation at steps 0 and
    STEPS (its value `final` at STEPS; 0.1 at step 0, the base model)."""
    logs = {"reward": reward} if step else {}
    if step in (0, STEPS):
        logs["eval/toy/avg_at_4"] = final if step else 0.1
    tracker.on_log(None, SimpleNamespace(global_step=step), None, logs=logs)


def test_a_resumed_training_counts_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file://{tmp_path / 'mlruns'}"

    def tracker(seed: int, resume: bool) -> MLflowCallback:
        overrides = [
            f"tracking.uri={uri}",
            "tracking.experiment=resumed",
            f"tracking.run_name=multi-s{seed}",
            f"train.seed={seed}",
            f"train.max_steps={STEPS}",
            f"train.output_dir={tmp_path / f'out-s{seed}'}",
        ]
        cfg = load_config(ROOT / "experiments" / "smoke.yaml", overrides)
        return MLflowCallback(cfg, cfg.train.output_dir, resume=resume)

    # Seed 0 crashes after logging step 3 with its last checkpoint at step 2, then resumes in
    # a continuation run, which finishes.
    crashed = tracker(0, resume=False)
    crashed.start(0)
    for step in range(4):
        log(crashed, step, 0.1 * step, 0.0)
    resumed = tracker(0, resume=True)
    resumed.start(2)
    for step in (3, 4):
        log(resumed, step, 0.2 * step, 0.5)
    resumed.end("FINISHED", STEPS)
    old_run = resumed.client.get_run(crashed.run_id)
    assert old_run.data.tags[CONTINUED_IN] == resumed.run_id
    assert resumed.client.get_run(resumed.run_id).data.tags[RESUMED_FROM] == crashed.run_id
    # Seed 1 runs through.
    plain = tracker(1, resume=False)
    plain.start(0)
    for step in range(STEPS + 1):
        log(plain, step, 0.3 * step, 0.3)
    plain.end("FINISHED", STEPS)

    compare = load_compare()
    assert compare.CONTINUED_IN == CONTINUED_IN
    out = tmp_path / "report"
    assert compare.main(["--experiment", "resumed", "--tracking-uri", uri, "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    row = next(r for r in report.splitlines() if r.startswith("| multi p=0.2 T=1.2/0.8 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["2", "0", "0, 1"]  # n finished, failed, seeds: seed 0 once
    # final reward (last 10 logged steps) over the two trainings: seed 0's history is the
    # copy up to the checkpoint (steps 1-2) and the continuation (3-4).
    seed0 = (0.1 + 0.2 + 0.6 + 0.8) / 4
    seed1 = (0.3 + 0.6 + 0.9 + 1.2) / 4
    assert cells[4].startswith(f"{(seed0 + seed1) / 2:.3f} ± ")
    assert cells[5].startswith(f"{(0.5 + 0.3) / 2:.3f} ± ")  # toy/avg@4 at the final step
    continued = report.split("## Continued runs")[1].split("## Runs")[0]
    assert f"continued in multi-s0 (`{resumed.run_id}`)" in continued
    assert crashed.run_id in continued
    assert "## Failed runs" not in report
    runs_section = report.split("## Runs")[1]
    assert resumed.run_id in runs_section and crashed.run_id not in runs_section
    # A continuation in another store is not among the compared runs: named by the tag.
    moved = compare.Run("a", "a", "x", {}, {CONTINUED_IN: f"b in {uri}"})
    assert compare.continuation(moved, {}) == f"run b in {uri}"
