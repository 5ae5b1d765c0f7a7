"""launch/train.py end to end on the tiny model: the closing summary, a quiet CPU start."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from script_loader import load_script

ROOT = Path(__file__).resolve().parent.parent


def launcher():
    return load_script(ROOT / "launch" / "train.py", "launch_train")


def test_a_finished_run_ends_with_its_summary(tmp_path, capsys):
    db = tmp_path / "mlflow.db"
    argv = [
        str(ROOT / "experiments" / "smoke.yaml"),
        f"train.output_dir={tmp_path / 'out'}",
        f"tracking.uri=sqlite:///{db}",
        "tracking.run_name=summary-test",
        "tracking.log_completions=false",
        "train.max_steps=2",
        "train.save_steps=100",
    ]
    assert launcher().main(argv) == 0
    run_id = (tmp_path / "out" / "mlflow_run_id").read_text().strip()
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = lines.index(f"run 'summary-test' (id {run_id}) finished 2 steps")
    assert lines[start + 1].startswith("reward: ") and "at step 1 ->" in lines[start + 1]
    assert lines[start + 1].endswith("at step 2")
    assert lines[start + 2] == f"tracking store: sqlite:///{db}"
    assert lines[start + 3] == f"browse it:  mlflow ui --backend-store-uri sqlite:///{db}"


def test_the_launcher_destroys_the_process_group_it_ends_with(tmp_path, monkeypatch):
    """Left to the interpreter's exit, a gloo process group can abort a finished run."""
    import torch.distributed as dist

    train = launcher()
    monkeypatch.setattr(train, "run", lambda cfg: 0)  # the group outlives training
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert train.main([str(ROOT / "experiments" / "smoke.yaml")]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.skipif(torch.accelerator.is_available(), reason="the CPU start only")
def test_deepspeed_starts_without_its_accelerator_warning_on_cpu():
    pytest.importorskip("deepspeed")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    code = (
        "import sys; sys.argv = ['train.py']; sys.path.insert(0, 'launch'); import train; "
        "from deepspeed.accelerator import get_accelerator; print(get_accelerator()._name)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "cpu"  # the accelerator DeepSpeed picks on its own here
    assert "Setting accelerator to CPU" not in proc.stderr, proc.stderr
