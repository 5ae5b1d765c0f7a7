"""The learning comparison: held-out sets disjoint from training, the batch plan, and the
report writer on a real MLflow store with a failed run (no GPU)."""

import importlib.util
import json
import shutil
import statistics
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Metric, Param

ROOT = Path(__file__).resolve().parent.parent


def load_learning():
    spec = importlib.util.spec_from_file_location("learning", ROOT / "bench" / "learning.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("experiment", ["learning.yaml", "arith.yaml"])
def test_evaluated_problems_are_not_in_the_training_set(experiment, tmp_path):
    """evaluate() itself, on the experiment's real datasets (a tiny model stands in for SmolLM2
    to keep it fast: the problems evaluated do not depend on the model)."""
    from mtrl.config import load_config
    from mtrl.data import load_prompts, normalize_question
    from mtrl.eval import evaluate
    from mtrl.models import load_model_and_tokenizer

    cfg = load_config(
        ROOT / "experiments" / experiment,
        [
            "model.name=tiny",
            "model.dtype=float32",
            "eval.num_samples=1",
            "eval.max_new_tokens=1",
            "eval.temperature=0",
            f"train.output_dir={tmp_path}",
        ],
    )
    model, tokenizer, _ = load_model_and_tokenizer(cfg.model, cfg.pbs)
    result = evaluate(model, tokenizer, cfg, write=False, show_progress=False)
    train = {normalize_question(q) for q in load_prompts(cfg.data, tokenizer)["problem"]}
    evaluated = [normalize_question(r["problem"]) for r in result["records"]]
    assert evaluated and not [q for q in evaluated if q in train]
    (bench,) = result["benchmarks"].values()
    loaded = len(load_prompts(cfg.eval.benchmarks[0], tokenizer))
    assert bench["dropped_overlap"] > 0  # both experiments' generators collide with training
    if experiment == "learning.yaml":  # few duplicates; the protocol's 500 problems remain
        assert bench["dropped_overlap"] / loaded < 0.06
        assert bench["num_problems"] == 500


def test_batch_plan_same_steps_and_seeds_in_every_arm(tmp_path):
    learning = load_learning()
    commands = learning.run_commands(
        list(learning.ARMS), [0, 3], 17, tmp_path, "file:///x", 0.873, ["rollout.engine=hf"]
    )
    assert sorted(commands) == sorted(f"{a}-s{s}" for a in learning.ARMS for s in (0, 3))
    for name, (arm, seed, command) in commands.items():
        assert name == f"{arm}-s{seed}"
        assert command[2].endswith("experiments/learning.yaml")
        for item in ["train.max_steps=17", "eval.every_n_steps=17", f"train.seed={seed}"]:
            assert item in command
        assert f"tracking.run_name={name}" in command and command[-1] == "rollout.engine=hf"
    # Seed-major: a deadline that cuts the batch costs the same seeds in every arm.
    assert [seed for _, seed, _ in commands.values()] == [0] * len(learning.ARMS) + [3] * len(
        learning.ARMS
    )
    matched = commands["single_matched-s0"][2]
    assert "sampler.mode=single" in matched and "sampler.temperature=0.873" in matched
    # Every override parses against the schema.
    from mtrl.config import load_config

    for _, _, command in commands.values():
        load_config(command[2], command[3:])


# ---------------------------------------------------------------------------- report


def make_run(client, exp, name, seed, final, temps=None, status="FINISHED", steps=4):
    run_id = client.create_run(exp, run_name=name).info.run_id
    mode = "multi" if temps else "single"
    params = {"train.seed": seed, "train.max_steps": steps, "sampler.mode": mode}
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    high, low = temps or (1.0, 1.0)
    metrics = []
    for step in range(1, steps + 1):
        share = 0.2 if temps else 0.0
        metrics += [
            Metric("reward", 0.1 * step, 0, step),
            Metric("sampler/entropy_mean", 0.5, 0, step),
            Metric("sampler/reasoning_share", share, 0, step),
            Metric("sampler/knowledge/temperature_mean", low, 0, step),
        ]
        if temps:
            metrics.append(Metric("sampler/reasoning/temperature_mean", high, 0, step))
    for step, value in ({0: 0.1, steps: final} if final is not None else {0: 0.1}).items():
        for key, v in [("avg_at_4", value), ("pass_at_4", min(1, 2 * value)),
                       ("boxed_rate", 0.9), ("mean_tokens", 20.0), ("dropped_overlap", 27.0),
                       ("num_problems", 500.0)]:  # fmt: skip
            metrics.append(Metric(f"eval/basic_arithmetic/{key}", v, 0, step))
    client.log_batch(run_id, metrics=metrics)
    if status != "RUNNING":
        client.set_terminated(run_id, status=status)
    return run_id


BASE = {0: 0.30, 1: 0.20, 2: 0.40}
MULTI = {0: 0.31, 1: 0.18, 2: 0.43}
RETRY = 0.36  # multi_p02-s0's second attempt


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Two calls: c1 ran single_t1 and multi_p02 (multi_p02-s2 ran out of memory although
    MLflow says FINISHED; single_t1-s2 never reached MLflow); c2 retried single_t1-s2 and ran
    multi_p02-s0 again (RETRY: the later attempt counts)."""
    root = tmp_path_factory.mktemp("work")
    calls = {}
    for call in ("c1", "c2"):
        (root / call).mkdir()
        uri = f"sqlite:///{root / call / 'mlflow.db'}"
        client = mlflow.MlflowClient(uri)
        calls[call] = (uri, client, client.create_experiment("learning"))
    _, client, exp = calls["c1"]
    for seed in (0, 1):
        make_run(client, exp, f"single_t1-s{seed}", seed, BASE[seed])
    for seed in (0, 1, 2):
        make_run(client, exp, f"multi_p02-s{seed}", seed, MULTI[seed], temps=(1.25, 0.75))
    _, client, exp = calls["c2"]
    make_run(client, exp, "single_t1-s2", 2, BASE[2])
    make_run(client, exp, "multi_p02-s0", 0, RETRY, temps=(1.25, 0.75))
    (root / "c1" / "multi_p02-s2.log").write_text(
        "step 3\nTraceback (most recent call last):\n  ...\n"
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 14.00 MiB.\n"
    )
    record = {"seconds": 60.0, "returncode": 0, "failure": None}
    runs = {
        "c1": [
            {"name": "single_t1-s0", "arm": "single_t1", "seed": 0, **record},
            {"name": "single_t1-s1", "arm": "single_t1", "seed": 1, **record},
            {
                "name": "single_t1-s2",
                "arm": "single_t1",
                "seed": 2,
                "seconds": 5.0,
                "returncode": 1,
                "failure": "exit status 1 (see single_t1-s2.log)",
            },
            {"name": "multi_p02-s0", "arm": "multi_p02", "seed": 0, **record},
            {"name": "multi_p02-s1", "arm": "multi_p02", "seed": 1, **record},
            {
                "name": "multi_p02-s2",
                "arm": "multi_p02",
                "seed": 2,
                "seconds": 50.0,
                "returncode": 1,
                "failure": "exit status 1 (see multi_p02-s2.log)",
            },
        ],  # fmt: skip
        "c2": [
            {"name": "single_t1-s2", "arm": "single_t1", "seed": 2, **record},
            {"name": "multi_p02-s0", "arm": "multi_p02", "seed": 0, **record},
        ],
    }
    for i, (call, (uri, _, _)) in enumerate(calls.items()):
        manifest = {
            "call": call, "card": "NVIDIA H100 80GB HBM3", "started": f"2026-12-05 0{i}:00:00 UTC",
            "commit": "abc1234", "command": f"python bench/learning.py --call {call}",
            "tracking_uri": uri, "steps": 4, "matched_temperature": None, "matched_from": None,
            "runs": runs[call], "minutes": 6.5,
        }  # fmt: skip
        (root / call / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_measured_temperature_from_finished_calibration_runs(work):
    learning = load_learning()
    value, names = learning.measured_temperature(work)
    # multi_p02-s2 exited 1: not used. Each step: 0.2 x 1.25 + 0.8 x 0.75 = 0.85.
    assert names == ["multi_p02-s0", "multi_p02-s1"] and value == pytest.approx(0.85)
    with pytest.raises(SystemExit, match="no finished multi_p02 run"):
        learning.measured_temperature(work / "nothing")


def test_report_lists_failures_and_gives_paired_intervals(work, tmp_path):
    learning = load_learning()
    out = tmp_path / "learning.md"
    assert learning.main(["--report", "--work", str(work), "--out", str(out)]) == 0
    text = out.read_text()
    compare = learning.load_compare()
    diffs = [RETRY - BASE[0], MULTI[1] - BASE[1]]  # seed 2 of multi_p02 failed
    mean, low, high = compare.paired_bootstrap(diffs)
    _, first_low, first_high = compare.paired_bootstrap([MULTI[s] - BASE[s] for s in (0, 1)])
    gain, gain_low, gain_high = compare.paired_bootstrap([BASE[s] - 0.1 for s in (0, 1, 2)])
    conclusion = text.split("## Conclusion")[1].split("## Protocol")[0]
    assert "multi_p02 vs single_t1 on basic_arithmetic/avg@4: no detectable difference" in (
        conclusion
    )
    assert f"[{100 * low:+.1f}, {100 * high:+.1f}], 2 paired seeds" in conclusion
    assert "Fewer paired seeds than the planned 5" in conclusion
    earliest = conclusion.split("with the earliest finished attempt")[1].splitlines()[0]
    assert "(1 differ: multi_p02-s0)" in earliest
    assert f"[{100 * first_low:+.1f}, {100 * first_high:+.1f}], 2 paired seeds" in earliest
    assert (
        "single_t1 scored higher than the shared start (its step 0) on basic_arithmetic/avg@4 "
        f"({100 * gain:+.1f} points, 95% CI [{100 * gain_low:+.1f}, {100 * gain_high:+.1f}], "
        "3 paired seeds)"
    ) in conclusion
    assert "`single_matched` not run yet: T = 0.85 measured from" in text
    assert "No finished runs for: single_matched, multi_p04, offsets." in conclusion
    _, t_low, t_high = compare.paired_t_interval(diffs)
    assert "Student-t intervals instead of the bootstrap's" in conclusion
    assert f"[{100 * t_low:+.1f}, {100 * t_high:+.1f}], 2 paired seeds" in conclusion
    assert conclusion.split("\n- ")[1].startswith(
        "Bottom line: no arm differs from single_t1 under every reading (the protocol's "
        "bootstrap, Student-t, earliest attempts)."
    )
    paired = text.split("### Paired differences against single_t1")[1]
    row = next(r for r in paired.splitlines() if r.startswith("| multi_p02 |"))
    assert row.split("|")[2].strip() == f"{mean:+.3f} [{low:+.3f}, {high:+.3f}] (n=2)"
    table = next(r for r in text.splitlines() if r.startswith("| multi_p02 | 2 | 1 |"))
    finals = [RETRY, MULTI[1]]
    assert f"{statistics.fmean(finals):.3f} ± {statistics.stdev(finals):.3f}" in table
    assert "| single_t1 | 3 | 0 | 0, 1, 2 |" in text  # the retry of c2 completes the baseline
    assert (
        "exit status 1 (see multi_p02-s2.log): torch.OutOfMemoryError: CUDA out of memory |"
    ) in text
    assert "multi_p02-s0 of c1 (finished): replaced by c2's" in text
    assert "single_t1-s2 of c1: exit status 1" in text  # the attempt without an MLflow run
    assert (
        "| c1 | NVIDIA H100 80GB HBM3 |" in text and "`python bench/learning.py --call c2`" in text
    )
    assert "basic_arithmetic: 27 dropped; 500 evaluated" in text
    for name in ["reward", "heldout", "entropy"]:
        assert f"(learning/{name}.png)" in text
        assert (tmp_path / "learning" / f"{name}.png").stat().st_size > 5000


def test_bottom_line_claims_only_what_every_reading_supports():
    learning = load_learning()
    higher = "offsets scored higher than single_t1 on m (+1.4 points, 95% CI [+0.4, +2.4])"
    none = "offsets vs single_t1 on m: no detectable difference (+1.4 points, 95% CI [-0.3, +3])"
    lower = "multi_p02 scored lower than single_t1 on m (-2.0 points, 95% CI [-3, -1])"
    both = {"bootstrap": [higher, lower], "t": [higher, lower]}
    assert learning.bottom_line(both, ["multi_p02", "offsets"]) == (
        "Bottom line: multi_p02 scored lower than single_t1; offsets scored higher than "
        "single_t1 under every reading (bootstrap, t)."
    )
    split = {"bootstrap": [higher, lower], "t": [none, lower]}
    text = learning.bottom_line(split, ["multi_p02", "offsets"])
    assert text.startswith("Bottom line: multi_p02 scored lower than single_t1 under every")
    assert text.endswith("Under some readings only: offsets higher; a lead to test with more "
                         "seeds, not a finding.")  # fmt: skip
    missing = {"bootstrap": [higher], "t": []}  # an arm without a verdict in one reading
    assert learning.bottom_line(missing, ["offsets"]).startswith("Bottom line: no arm differs")


def test_batch_starts_no_run_that_the_slowest_ended_run_says_cannot_finish(tmp_path, monkeypatch):
    """One at a time, 2-second runs, a 3-second deadline: the first ends at about 2 s, so the
    second (2 + 2 > 3) is never started, and both it and the third are recorded why."""
    learning = load_learning()
    sleep = [sys.executable, "-c", "import time; time.sleep(1)"]
    monkeypatch.setattr(
        learning,
        "run_commands",
        lambda arms, seeds, *_: {f"{a}-s{s}": (a, s, sleep) for s in seeds for a in arms},
    )
    args = ["--call", "c1", "--arms", "single_t1", "--seeds", "0", "1", "2", "--parallel", "1"]
    assert learning.main([*args, "--work", str(tmp_path), "--deadline", "3"]) == 1
    runs = json.loads((tmp_path / "c1" / "manifest.json").read_text())["runs"]
    assert [r["name"] for r in runs] == ["single_t1-s0", "single_t1-s1", "single_t1-s2"]
    assert runs[0]["failure"] is None and runs[0]["returncode"] == 0
    for run in runs[1:]:
        assert run["returncode"] is None
        assert run["failure"].startswith("not started: the slowest run (2 s) would not end")


def test_missing_runs_only_what_no_earlier_call_finished(work, tmp_path, monkeypatch):
    """--missing: of single_t1 and multi_p02 x seeds 0-2, only multi_p02-s2 (it ran out of
    memory in c1) has no finished attempt, so it is the one run of the retry."""
    learning = load_learning()
    copy = tmp_path / "work"
    shutil.copytree(work, copy)  # the fixture's stores stay where its manifests say
    sleep = [sys.executable, "-c", "pass"]
    monkeypatch.setattr(
        learning,
        "run_commands",
        lambda arms, seeds, *_: {f"{a}-s{s}": (a, s, sleep) for s in seeds for a in arms},
    )
    args = ["--call", "c3", "--arms", "single_t1", "multi_p02", "--seeds", "0", "1", "2"]
    assert learning.main([*args, "--missing", "--work", str(copy)]) == 0
    runs = json.loads((copy / "c3" / "manifest.json").read_text())["runs"]
    assert [r["name"] for r in runs] == ["multi_p02-s2"]


def test_batches_on_cpu_end_to_end(tmp_path):
    """Two real calls with a tiny model (seconds each): the matched arm takes its temperature
    from the first call's multi run; a third call hits its deadline; the report has them all."""
    learning = load_learning()
    work = tmp_path / "work"
    tiny = [
        "model.name=tiny",
        "train.bf16=false",
        "train.per_device_train_batch_size=8",
        "train.max_completion_length=8",
        "eval.max_new_tokens=4",
        "eval.max_problems=8",
        "eval.num_samples=2",
    ]
    common = ["--work", str(work), "--seeds", "0", "--steps", "1"]
    assert learning.main(["--call", "c1", "--arms", "single_t1", "multi_p02", *common, *tiny]) == 0
    with pytest.raises(SystemExit, match="already holds a call"):
        learning.main(["--call", "c1", "--arms", "single_t1", *common, *tiny])
    assert learning.main(["--call", "c2", "--arms", "single_matched", *common, *tiny]) == 0
    expected, names = learning.measured_temperature(work)  # the tiny model's own mixture
    assert names == ["multi_p02-s0"] and 0.8 <= expected <= 1.2
    manifest = json.loads((work / "c2" / "manifest.json").read_text())
    assert manifest["matched_temperature"] == expected
    assert manifest["matched_from"] == ["multi_p02-s0"]
    late = ["--call", "c3", "--arms", "offsets", "--deadline", "0.5", *common, *tiny]
    assert learning.main(late) == 1
    out = tmp_path / "learning.md"
    moved = tmp_path / "fetched"  # as the calls' folders come back from the GPU machines
    work.rename(moved)
    assert learning.main(["--report", "--work", str(moved), "--out", str(out)]) == 0
    text = out.read_text()
    assert f"`single_matched` in c2: T = {expected} from ['multi_p02-s0']" in text
    assert "killed at the batch deadline (0 s)" in text or "not started" in text
    assert "| single_t1 | 1 | 0 | 0 |" in text and "| single_matched | 1 | 0 | 0 |" in text
