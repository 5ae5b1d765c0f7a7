"""launch/compare.py renders figures and a table from a local MLflow store holding real runs,
leaves failed runs out (and lists them), and compares groups by seed with a bootstrap CI."""

import importlib.util
import itertools
import math
import statistics
import sys
import time
from pathlib import Path

import mlflow
import pytest
from free_port import free_port
from mlflow.entities import Metric, Param

ROOT = Path(__file__).resolve().parent.parent


def load_compare():
    spec = importlib.util.spec_from_file_location("compare", ROOT / "launch" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def make_run(
    client, experiment_id, name, params, rewards, evals, share, temps=None, status="FINISHED"
):
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
    if status != "RUNNING":  # a crashed process leaves its run RUNNING
        client.set_terminated(run_id, status=status)
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
        "| group | n | failed | seeds | final reward (last 10) | toy/avg@4 | toy/pass@4 | toy/maj@4 |"
        in report
    )
    rows = [line for line in report.splitlines() if line.startswith("| single T=1.0 |")]
    assert rows and rows[0].startswith(
        "| single T=1.0 | 1 | 0 | 0 | 0.250 |"
    )  # mean reward of the last <= 10 steps, one run
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
    assert cells[1] == "2" and cells[2] == "0" and cells[3] == "0, 1"
    std = math.sqrt(((0.4 - 0.5) ** 2 + (0.6 - 0.5) ** 2) / 1)
    assert cells[4] == f"0.500 ± {std:.3f}"
    assert cells[7] == f"0.400 ± {math.sqrt(0.02):.3f} (from 0.100)"
    agg = compare.aggregate([[(1, 1.0), (2, 3.0)], [(2, 5.0)]])
    assert agg["step"] == [1, 2] and agg["mean"] == [1.0, 4.0] and agg["n"] == [1, 2]


# ---------------------------------------------------------------------------- failed runs, pairing

SINGLE = {"sampler.mode": "single", "sampler.temperature": 1.0, "train.max_steps": 4}
MULTI = {
    "sampler.mode": "multi",
    "sampler.reasoning_fraction": 0.2,
    "sampler.high_temperature": 1.2,
    "sampler.low_temperature": 0.8,
    "train.max_steps": 4,
}
BASE_FINAL = {0: 0.30, 1: 0.10, 2: 0.50, 3: 0.20, 4: 0.40}
MULTI_FINAL = {0: 0.35, 1: 0.30, 2: 0.55, 3: 0.40, 4: 0.55}


@pytest.fixture(scope="module")
def paired_store(store):
    """Five seeds per setting; multi seed 4 crashed (RUNNING, no final eval), an extra multi
    run was KILLED and one single run FINISHED without its final evaluation."""
    uri, _ = store
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("paired")
    rewards = [0.1, 0.2, 0.3, 0.4]
    for seed, final in BASE_FINAL.items():
        make_run(
            client,
            exp,
            f"single-s{seed}",
            {**SINGLE, "train.seed": seed},
            rewards,
            {0: 0.1, 4: final},
            0.2,
        )
    for seed, final in MULTI_FINAL.items():
        crashed = seed == 4
        make_run(
            client,
            exp,
            f"multi-s{seed}",
            {**MULTI, "train.seed": seed},
            rewards[:2],
            {0: 0.1} if crashed else {0: 0.1, 4: final},
            0.2,
            (1.2, 0.8),
            status="RUNNING" if crashed else "FINISHED",
        )
    make_run(
        client,
        exp,
        "multi-s9",
        {**MULTI, "train.seed": 9},
        rewards,
        {0: 0.1, 4: 0.9},
        0.2,
        (1.2, 0.8),
        status="KILLED",
    )
    make_run(client, exp, "single-s9", {**SINGLE, "train.seed": 9}, rewards, {0: 0.1, 2: 0.2}, 0.2)
    return uri


def test_failed_runs_are_listed_and_left_out(paired_store, tmp_path):
    compare = load_compare()
    out = tmp_path / "paired"
    assert (
        compare.main(["--experiment", "paired", "--tracking-uri", paired_store, "--out", str(out)])
        == 0
    )
    report = (out / "report.md").read_text()
    row = next(r for r in report.splitlines() if r.startswith("| multi p=0.2 T=1.2/0.8 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["4", "2", "0, 1, 2, 3"]  # n finished, failed, seeds
    finals = [MULTI_FINAL[s] for s in range(4)]  # the crashed seed is not a 0 in the mean
    mean, std = statistics.fmean(finals), statistics.stdev(finals)
    assert cells[5].startswith(f"{mean:.3f} ± {std:.3f}")
    base = next(r for r in report.splitlines() if r.startswith("| single T=1.0 |"))
    assert [c.strip() for c in base.strip("|").split("|")][1:3] == ["5", "1"]
    failed = report.split("## Failed runs (left out)")[1].split("## Runs")[0]
    assert "multi-s4" in failed and "status RUNNING" in failed
    assert "multi-s9" in failed and "MLflow status KILLED" in failed
    assert "single-s9" in failed and "no evaluation at the final step 4 (last at step 2)" in failed
    runs_section = report.split("## Runs")[1]
    assert "multi-s4" not in runs_section and "multi-s1" in runs_section


def test_paired_difference_and_bootstrap_interval(paired_store, tmp_path):
    compare = load_compare()
    out = tmp_path / "paired-ci"
    args = ["--experiment", "paired", "--tracking-uri", paired_store, "--out", str(out)]
    assert compare.main([*args, "--baseline", "single T=1.0"]) == 0
    report = (out / "report.md").read_text()
    diffs = [MULTI_FINAL[s] - BASE_FINAL[s] for s in range(4)]  # seeds with both runs finished
    mean, low, high = compare.paired_bootstrap(diffs)
    assert mean == pytest.approx(statistics.fmean(diffs))
    row = next(r for r in report.splitlines() if r.startswith("| multi p=0.2 T=1.2/0.8 | +"))
    assert row.split("|")[2].strip() == f"{mean:+.3f} [{low:+.3f}, {high:+.3f}] (n=4)"
    # The percentile bounds against the exact bootstrap distribution (all 4^4 resamples).
    exact = sorted(statistics.fmean(c) for c in itertools.product(diffs, repeat=4))
    q = statistics.quantiles(exact, n=40, method="inclusive")  # 2.5% steps
    assert low == pytest.approx(q[0], abs=0.01) and high == pytest.approx(q[-1], abs=0.01)
    assert low > 0  # every difference is positive: the sentence says "higher"
    assert "multi p=0.2 T=1.2/0.8 scored higher than single T=1.0 on toy/avg@4" in report
    # Same data, same interval (fixed RNG seed); constant differences give a point.
    assert compare.paired_bootstrap(diffs) == (mean, low, high)
    assert compare.paired_bootstrap([0.1, 0.1, 0.1]) == pytest.approx((0.1, 0.1, 0.1))
    text = compare.verdict("a", "b", "acc", (0.01, -0.02, 0.04), 5)
    assert "no detectable difference" in text and "[-2.0, +4.0]" in text
    assert "98.75% CI [-2.0, +4.0]" in compare.verdict("a", "b", "acc", (0.01, -0.02, 0.04), 5,
                                                       1 - 0.05 / 4)  # fmt: skip


def test_paired_t_interval_is_the_textbook_one():
    """diffs 1..5: mean 3, standard error sqrt(2.5 / 5), t(0.975, 4 df) = 2.7764; wider than
    the percentile bootstrap of the same 5 values."""
    compare = load_compare()
    mean, low, high = compare.paired_t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776445 * (2.5 / 5) ** 0.5
    assert (mean, low, high) == pytest.approx((3.0, 3.0 - half, 3.0 + half), abs=1e-5)
    _, boot_low, boot_high = compare.paired_bootstrap([1.0, 2.0, 3.0, 4.0, 5.0])
    assert low < boot_low and high > boot_high
    wider = compare.paired_t_interval([1.0, 2.0, 3.0, 4.0, 5.0], level=0.99)
    assert wider[1] < low and wider[2] > high
    with pytest.raises(ValueError, match="at least 2"):
        compare.paired_t_interval([1.0])


def test_dead_tracking_server_fails_fast(tmp_path, capsys):
    compare = load_compare()
    port = free_port()  # nothing listens on it
    started = time.monotonic()
    code = compare.main(
        [
            "--experiment",
            "x",
            "--tracking-uri",
            f"http://127.0.0.1:{port}",
            "--out",
            str(tmp_path / "dead"),
        ]
    )
    assert code == 2 and time.monotonic() - started < 10
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"no MLflow server answers at http://127.0.0.1:{port}" in err
