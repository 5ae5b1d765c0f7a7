"""launch/compare.py renders figures and a table from a local MLflow store holding real runs."""

import importlib.util
import math
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Metric, Param

ROOT = Path(__file__).resolve().parent.parent


def load_compare():
    spec = importlib.util.spec_from_file_location("compare", ROOT / "launch" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def make_run(client, experiment_id, name, params, rewards, evals, share, temps=None):
    run_id = client.create_run(experiment_id, run_name=name).info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    metrics = []
    for step, value in enumerate(rewards, start=1):
        metrics += [
            Metric("reward", value, 0, step),
            Metric("sampler/reasoning_share", share, 0, step),
            Metric("sampler/entropy_mean", 1.0 - 0.01 * step, 0, step),
        ]
        high, low = temps or (1.0, 1.0)
        metrics += [
            Metric("sampler/reasoning/temperature_mean", high, 0, step),
            Metric("sampler/knowledge/temperature_mean", low, 0, step),
        ]
    for step, value in evals.items():
        metrics += [
            Metric("eval/toy/avg_at_4", value, 0, step),
            Metric("eval/toy/pass_at_4", min(1.0, 2 * value), 0, step),
            Metric("eval/toy/maj_at_4", value, 0, step),
        ]
    client.log_batch(run_id, metrics=metrics)
    client.set_terminated(run_id)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # one store for the module: creating an MLflow sqlite database takes seconds
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("cmp")
    single = {
        "sampler.mode": "single",
        "sampler.temperature": 1.0,
        "train.seed": 0,
        "train.beta": 0.0,
    }
    multi = {
        "sampler.mode": "multi",
        "sampler.reasoning_fraction": 0.2,
        "sampler.high_temperature": 1.2,
        "sampler.low_temperature": 0.8,
        "train.seed": 1,
        "train.beta": 0.0,
    }
    ids = [
        make_run(client, exp, "single-s0", single, [0.1, 0.2, 0.3, 0.4], {0: 0.1, 4: 0.3}, 0.2),
        make_run(
            client,
            exp,
            "multi-s1",
            multi,
            [0.2, 0.3, 0.5, 0.6],
            {0: 0.1, 4: 0.5},
            0.25,
            (1.2, 0.8),
        ),
    ]
    return uri, ids


def test_compare_renders_figures_and_table(store, tmp_path):
    uri, ids = store
    compare = load_compare()
    out = tmp_path / "report"
    assert compare.main(["--experiment", "cmp", "--tracking-uri", uri, "--out", str(out)]) == 0
    for name in ["reward", "heldout", "reasoning_share", "temperatures", "entropy"]:
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert png.stat().st_size > 5000
    report = (out / "report.md").read_text()
    assert (
        "| group | runs | seeds | final reward (last 10) | toy/avg@4 | toy/pass@4 | toy/maj@4 |"
        in report
    )
    rows = [line for line in report.splitlines() if line.startswith("| single T=1.0 |")]
    assert rows and "| 0.250 |" in rows[0]  # mean reward of the last <= 10 steps, one run
    assert "0.300 (from 0.100)" in rows[0]  # final held-out accuracy, base model in brackets
    assert "| multi p=0.2 T=1.2/0.8 |" in report
    assert "![Reward](reward.png)" in report and "![Held-out accuracy](heldout.png)" in report
    assert all(run_id in report for run_id in ids)


def test_compare_groups_seeds_as_repeats(store, tmp_path):
    uri, ids = store
    compare = load_compare()
    out = tmp_path / "by-experiment"
    args = ["--runs", *ids, "--tracking-uri", uri, "--out", str(out), "--band", "std"]
    assert compare.main([*args, "--group-by", "param.train.beta", "--final-window", "1"]) == 0
    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| train.beta=0.0 |")]
    assert len(rows) == 3  # one group in the table, its two runs in the run list
    row = rows[0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2" and cells[2] == "0, 1"
    std = math.sqrt(((0.4 - 0.5) ** 2 + (0.6 - 0.5) ** 2) / 1)
    assert cells[3] == f"0.500 ± {std:.3f}"
    assert cells[6] == f"0.400 ± {math.sqrt(0.02):.3f} (from 0.100)"
    agg = compare.aggregate([[(1, 1.0), (2, 3.0)], [(2, 5.0)]])
    assert agg["step"] == [1, 2] and agg["mean"] == [1.0, 4.0] and agg["n"] == [1, 2]
