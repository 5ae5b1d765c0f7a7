"""Evaluate a model: `python launch/eval.py experiments/aime.yaml [key=value ...]`.

The `eval` section picks benchmarks and sampling (num_samples, temperature, top_p,
max_new_tokens). `model.name=<folder>` evaluates a trained checkpoint (a training output
folder). Prints a table, writes the JSON (`eval.output_file`, `--output`, or
<output_dir>/eval/eval.json) and logs an MLflow run in the experiment `<experiment>-eval`
(`--run-id` logs into an existing run instead, e.g. the training run; `--no-mlflow` skips).
A bad config ends with exit status 2 and one line naming the key path, before any loading;
so does a tracking server that does not answer (the same check and line as launch/compare.py).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled

from mtrl.cli import exit_with, parse_experiment  # noqa: E402
from mtrl.config import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="JSON file to write (default: eval.output_file)")
    parser.add_argument("--step", type=int, help="step to log the metrics at (default 0)")
    parser.add_argument("--run-id", help="log into this existing MLflow run")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda:N")
    args, cfg = parse_experiment(parser, argv)
    if not cfg.eval.benchmarks:
        exit_with(ConfigError("eval.benchmarks: name at least one benchmark"))
    if not args.no_mlflow:
        # Before the evaluation, which takes minutes: its results would go to a dead server.
        from launch.compare import check_reachable

        try:
            check_reachable(cfg.tracking.uri, key="tracking.uri")
        except SystemExit as exc:
            print(exc, file=sys.stderr)
            return 2

    import torch
    from omegaconf import OmegaConf

    from mtrl.data import DataError, load_prompts
    from mtrl.eval import evaluate, format_table
    from mtrl.models import load_model_and_tokenizer, load_tokenizer
    from mtrl.scoring import configure as configure_scoring

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    configure_scoring(OmegaConf.to_object(cfg.scoring))  # limits of the answer-checking workers
    try:
        # Tokenizer and benchmark data first: their errors (a bad row, a prompt over
        # data.max_prompt_tokens) end the run before the weights are read.
        tokenizer = load_tokenizer(cfg.model)
        for bench in cfg.eval.benchmarks:
            load_prompts(bench, tokenizer)
        model, tokenizer, _ = load_model_and_tokenizer(cfg.model, cfg.pbs, tokenizer=tokenizer)
        model.to(device)
        result = evaluate(model, tokenizer, cfg, step=None, output_file=args.output)
    except (ConfigError, DataError) as exc:
        exit_with(exc)
    result["step"] = args.step
    print(format_table(result))
    print(f"results: {result['output_file']}")
    if not args.no_mlflow:
        run_id = log_run(cfg, result, args.run_id, args.step or 0)
        print(f"mlflow: run {run_id} at {cfg.tracking.uri}")
    return 0


def log_run(cfg, result: dict, run_id: str | None, step: int) -> str:
    """Log the result to `run_id`, or to a new run in the experiment `<experiment>-eval`."""
    import mlflow

    from mtrl.eval import log_to_mlflow
    from mtrl.tracking import create_run, open_client

    mlflow.set_tracking_uri(cfg.tracking.uri)  # log_to_mlflow's client uses it
    client = open_client(cfg.tracking.uri)
    created = run_id is None
    if created:
        experiment = f"{cfg.tracking.experiment or cfg.name}-eval"
        name = cfg.tracking.run_name or f"eval-{Path(str(cfg.model.name)).name}"
        tags = {"mtrl.kind": "eval", "mtrl.model": str(cfg.model.name)}
        run_id = create_run(client, cfg, experiment, name, tags)
    log_to_mlflow(result, run_id, step=step)
    if created:
        client.set_terminated(run_id, status="FINISHED")
    return run_id


if __name__ == "__main__":
    sys.exit(main())
