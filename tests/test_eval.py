"""Evaluation: the pass@k estimator, majority vote, scoring, the tiny model end to end, the CLI."""

import itertools
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import mlflow
import pytest

from mtrl.eval import (
    EvalCallback,
    evaluate,
    maj_at_k,
    majority_vote,
    mlflow_metrics,
    pass_at_k,
    pass_ks,
    score_problems,
)

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "experiments" / "smoke.yaml"

BENCH = [
    {"problem": "What is 2 + 2?", "answer": "4"},
    {"problem": "What is 3 * 3?", "answer": "9"},
    {"problem": "Compute 1/2 + 1/4.", "answer": "\\frac{3}{4}"},
]


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Share of the k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(any(i < c for i in subset) for subset in subsets)
    return Fraction(hits, len(subsets))


def test_pass_at_k_matches_brute_force_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = float(brute_force_pass_at_k(n, c, k))
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_edges_and_large_n():
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # large n: the product form stays finite where binomials would overflow a float
    value = pass_at_k(2000, 7, 1000)
    assert 0.99 < value < 1.0
    for bad in [(0, 0, 1), (4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)
    assert pass_ks(1) == [1]
    assert pass_ks(4) == [1, 2, 4]
    assert pass_ks(6) == [1, 2, 4, 6]


def test_majority_vote_groups_equivalent_answers():
    assert majority_vote(["1/2", "0.5", "3", "\\frac{1}{2}"]) in ("1/2", "0.5", "\\frac{1}{2}")
    assert majority_vote([None, None]) is None
    assert majority_vote([None, "7", None]) == "7"
    assert majority_vote(["3", "4"]) == "3"  # tie: the first seen
    assert majority_vote(["x + 1", "x+1", "2"]) == "x + 1"  # normalized text
    assert maj_at_k("\\frac{1}{2}", ["0.5", "2", "1/2", None]) == 1.0
    assert maj_at_k("2", ["0.5", "2", "1/2", None]) == 0.0
    assert maj_at_k("2", [None, None]) == 0.0


def test_score_problems_from_known_completions():
    problems = [{"problem": p["problem"], "answer": p["answer"]} for p in BENCH]
    completions = [
        ["so \\boxed{4}", "\\boxed{5}", "4", "\\boxed{4.0}"],  # 2 correct, maj 4 (4 ~ 4.0)
        ["\\boxed{8}", "\\boxed{8}", "\\boxed{9}", "no answer"],  # 1 correct, maj 8
        ["\\boxed{0.75}", "\\boxed{\\frac{3}{4}}", "\\boxed{3/4}", "\\boxed{1}"],  # 3, maj 3/4
    ]
    metrics, records = score_problems("toy", problems, completions, [[5] * 4] * 3)
    counts = [r["num_correct"] for r in records]
    assert counts == [2, 1, 3]  # "4" unboxed does not count; 4.0 does
    assert metrics["avg@4"] == pytest.approx(6 / 12)
    assert metrics["pass@1"] == pytest.approx(6 / 12)
    assert metrics["pass@2"] == pytest.approx(sum(pass_at_k(4, c, 2) for c in counts) / 3)
    assert metrics["pass@4"] == 1.0
    assert metrics["maj@4"] == pytest.approx(2 / 3)
    assert [r["majority_correct"] for r in records] == [True, False, True]
    assert metrics["boxed_rate"] == pytest.approx(10 / 12)
    assert metrics["mean_tokens"] == 5.0
    assert records[1]["predictions"] == ["8", "8", "9", None]
    renamed = mlflow_metrics({"eval/toy/pass@4": 1.0, "eval/toy/x": float("nan")})
    assert renamed == {"eval/toy/pass_at_4": 1.0}


def test_majority_vote_compares_distinct_answers_in_the_sandbox():
    # Six halves in four texts ("1 / 2" normalizes to "1/2"; "0.50", "\\frac{1}{2}" join the
    # "0.5" cluster through math-verify) against five twos; None and "" are no answer.
    preds = ["2", "0.5", "2", "1/2", " 2 ", "\\frac{1}{2}", None, "2", "1 / 2", "", "2"]
    preds += ["0.50", "0.5"]
    assert majority_vote(preds) == "0.5"  # 6 halves beat 5 twos
    problems = [{"problem": "half", "answer": "\\frac{1}{2}"}, {"problem": "two", "answer": "2"}]
    texts = ["no box" if p is None else f"\\boxed{{{p}}}" for p in preds]
    metrics, records = score_problems("toy", problems, [texts, texts])
    assert [r["majority"] for r in records] == ["0.5", "0.5"]
    assert [r["majority_correct"] for r in records] == [True, False]
    assert [r["num_correct"] for r in records] == [6, 5]
    assert metrics["scoring_timeouts"] == 0.0
    assert metrics["scoring_crashes"] == 0.0


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """One MLflow store for the module's tests (creating a sqlite store takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def bench_file(tmp_path):
    path = tmp_path / "toy_bench.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in BENCH))
    return path


def test_evaluate_tiny_model_end_to_end(smoke_config, bench_file, tmp_path):
    from mtrl.models import load_model_and_tokenizer

    cfg = smoke_config(
        f"eval.benchmarks=[{{source: {bench_file}}}]",
        "eval.num_samples=3",
        "eval.max_new_tokens=6",
        "eval.batch_size=4",
    )
    model, tokenizer, _ = load_model_and_tokenizer(cfg.model, cfg.pbs)
    model.train()
    out = tmp_path / "res.json"
    result = evaluate(model, tokenizer, cfg, step=7, output_file=out, show_progress=False)
    assert model.training  # mode restored
    metrics = result["metrics"]
    for name in ["avg@3", "pass@1", "pass@2", "pass@3", "maj@3", "boxed_rate", "mean_tokens"]:
        assert 0.0 <= metrics[f"eval/toy_bench/{name}"] <= max(6.0, 1.0)
    assert metrics["eval/toy_bench/num_problems"] == 3
    assert len(result["records"]) == 3
    for record in result["records"]:
        assert len(record["completions"]) == 3
        assert all(1 <= t <= 6 for t in record["num_tokens"])
    saved = json.loads(out.read_text())
    assert saved["step"] == 7 and saved["metrics"] == metrics
    assert saved["settings"]["temperature"] == 0.6 and saved["settings"]["top_p"] == 0.95

    # Same seed, same samples; greedy decoding gives identical samples per problem.
    again = evaluate(model, tokenizer, cfg, write=False, show_progress=False)
    assert [r["completions"] for r in again["records"]] == [
        r["completions"] for r in result["records"]
    ]
    cfg.eval.temperature = 0.0
    greedy = evaluate(model, tokenizer, cfg, write=False, show_progress=False)
    assert all(len(set(r["completions"])) == 1 for r in greedy["records"])


def test_eval_callback_logs_through_the_trainer(
    make_trainer, smoke_config, bench_file, tracking_uri
):
    overrides = (
        f"tracking.uri={tracking_uri}",
        f"eval.benchmarks=[{{source: {bench_file}}}]",
        "eval.num_samples=2",
        "eval.max_new_tokens=4",
        "eval.every_n_steps=2",
        "eval.max_problems=2",
        "train.max_steps=3",
        "train.save_steps=100",
    )
    from mtrl.tracking import MLflowCallback

    cfg = smoke_config(*overrides)  # first: building a GRPOConfig resets accelerate's state
    tracker = MLflowCallback(cfg, cfg.train.output_dir, resume=False)
    trainer = make_trainer(*overrides, callbacks=[tracker])
    tracker.trainer = trainer
    callback = EvalCallback(cfg, trainer)
    trainer.add_callback(callback)  # after the tracker: logging goes through Trainer.log
    trainer.train()
    # the base model before any update, every 2 steps, and the last step
    assert [r["step"] for r in callback.results] == [0, 2, 3]
    logged = [h for h in trainer.state.log_history if "eval/toy_bench/avg_at_2" in h]
    assert [h["step"] for h in logged] == [0, 2, 3]
    assert any("reward" in h for h in trainer.state.log_history)  # GRPO's own logs intact
    # ...also at the steps that evaluate: the training log of step 2 and 3 is not dropped
    assert {2, 3} <= {h["step"] for h in trainer.state.log_history if "loss" in h}
    assert (Path(trainer.args.output_dir) / "eval" / "step_000002.json").is_file()
    client = mlflow.MlflowClient(cfg.tracking.uri)
    history = client.get_metric_history(tracker.run_id, "eval/toy_bench/maj_at_2")
    assert sorted(m.step for m in history) == [0, 2, 3]


def test_launch_eval_writes_json_and_an_mlflow_run(bench_file, tmp_path, tracking_uri):
    out = tmp_path / "eval.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "eval.py"),
            str(SMOKE),
            f"eval.benchmarks=[{{source: {bench_file}}}]",
            "eval.num_samples=2",
            "eval.max_new_tokens=4",
            f"tracking.uri={tracking_uri}",
            f"train.output_dir={tmp_path / 'out'}",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "avg@2" in proc.stdout and "toy_bench" in proc.stdout
    saved = json.loads(out.read_text())
    assert len(saved["records"]) == 3
    mlflow.set_tracking_uri(tracking_uri)
    (run,) = mlflow.search_runs(experiment_names=["smoke-eval"], output_format="list")
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "tiny"
    assert run.data.metrics["eval/toy_bench/avg_at_2"] == saved["metrics"]["eval/toy_bench/avg@2"]
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "eval")]
    assert artifacts == ["eval/eval.json"]


def test_launch_eval_bad_config_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "eval.py"), str(SMOKE), "eval.num_sampels=2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "eval.num_sampels" in lines[0], proc.stderr


def test_training_and_evaluation_sample_through_the_one_generate(
    make_trainer, smoke_config, bench_file, monkeypatch
):
    """Rollouts and evaluation both end in `mtrl.rollout.generate` (its EOS masking step)."""
    import importlib

    from mtrl.eval import evaluate

    module = importlib.import_module("mtrl.rollout.generate")
    calls = []
    real = module._finish

    def counting(raw, eos, pad):
        calls.append(raw.backend)
        return real(raw, eos, pad)

    monkeypatch.setattr(module, "_finish", counting)
    trainer = make_trainer("rollout.engine=fast")
    inputs = [trainer.train_dataset[0]] * trainer.num_generations
    trainer._generate_and_score_completions(inputs)
    assert calls == ["engine"]
    cfg = smoke_config(
        f"eval.benchmarks=[{{source: {bench_file}}}]",
        "eval.num_samples=2",
        "eval.max_new_tokens=4",
        "eval.batch_size=4",
        "rollout.engine=fast",
    )
    rows = []
    monkeypatch.setattr(
        module,
        "_finish",
        lambda raw, eos, pad: rows.append(raw.completion_ids.size(0)) or real(raw, eos, pad),
    )
    result = evaluate(
        trainer.model, trainer.processing_class, cfg, write=False, show_progress=False
    )
    # 3 problems x 2 samples in batches of 4: the short last batch is filled to 4 (one CUDA
    # graph per batch size), and its filler outputs are dropped.
    assert rows == [4, 4]
    assert [len(r["completions"]) for r in result["records"]] == [2, 2, 2]
