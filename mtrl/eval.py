"""Evaluation: avg@k, pass@k (unbiased) and maj@k per benchmark, sampled like the paper evaluates.

    from mtrl.eval import evaluate, pass_at_k
    result = evaluate(model, tokenizer, cfg, step=None)
    result["metrics"]   # {"eval/<bench>/avg@4": ..., "eval/<bench>/pass@1": ..., ...}
    result["records"]   # one dict per problem: completions, predictions, correctness, vote
    result["output_file"]  # where the JSON went

Each benchmark of `cfg.eval.benchmarks` (a `data:`-style section) is loaded with
`mtrl.data.load_prompts`; every problem gets `eval.num_samples` completions, drawn through the
multi-temperature sampler in `single` mode at `eval.temperature` / `eval.top_p` (the paper:
T = 0.6, top_p = 0.95; `eval.temperature: 0` is greedy decoding), `eval.max_new_tokens` at
most, `eval.batch_size` sequences per call of `mtrl.rollout.generate` (the trainer's path: the
fast engine where `rollout.engine` allows, transformers `generate` otherwise), prompts
left-padded.

Scoring is the `accuracy` reward's: the content of the last `\\boxed{}` of a completion
against the gold answer under math-verify (`mtrl.rewards.math_equal`), run in the sandboxed
workers of `mtrl.scoring` (time and memory limits per call). Metrics per benchmark
with n = num_samples:

- `avg@n`: mean accuracy over all n samples of all problems (= the unbiased pass@1);
- `pass@k` for k = 1, 2, 4, ... and n: the unbiased estimator 1 - C(n-c, k) / C(n, k)
  (Chen et al., 2021), averaged over problems;
- `maj@n`: majority vote over the n extracted answers (answers grouped by normalized text
  or math-verify equivalence; no answer never wins), correct when the winner is;
- `boxed_rate`, `truncated_rate`, `mean_tokens`, `num_problems`.

MLflow metric names may not contain `@`: `mlflow_metrics` turns `avg@4` into `avg_at_4`, and
both `log_to_mlflow` and `EvalCallback` log those names.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import TrainerCallback

from mtrl.config import ExperimentConfig
from mtrl.rewards import last_boxed, matching_answers, math_equal
from mtrl.scoring import Scored, score

logger = logging.getLogger(__name__)

__all__ = [
    "EvalCallback",
    "benchmark_name",
    "evaluate",
    "log_to_mlflow",
    "maj_at_k",
    "majority_vote",
    "mlflow_metrics",
    "pass_at_k",
    "pass_ks",
    "score_completion",
    "score_problems",
]


# ---------------------------------------------------------------------------- estimators


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i), which never forms a large binomial.
    """
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_ks(n: int) -> list[int]:
    """The k reported for n samples: 1, 2, 4, ... below n, and n."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return [*ks, n]


def _normalize(answer: str) -> str:
    text = re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", answer)
    text = re.sub(r"\\[,;!: ]|\\left|\\right|\s+|\$", "", text)
    return text.rstrip(".").lower()


def _vote_groups(
    predictions: Sequence[str | None],
) -> tuple[list[str], list[int], list[int]]:
    """Answers grouped by normalized text: (first answer, its sample index, count) per group."""
    firsts: list[str] = []
    where: list[int] = []
    counts: list[int] = []
    seen: dict[str, int] = {}
    for i, pred in enumerate(predictions):
        if pred is None or not str(pred).strip():
            continue
        norm = _normalize(pred)
        if norm in seen:
            counts[seen[norm]] += 1
        else:
            seen[norm] = len(firsts)
            firsts.append(pred)
            where.append(i)
            counts.append(1)
    return firsts, where, counts


def _majority_votes(runs: Sequence[Sequence[str | None]]) -> tuple[list[int | None], Scored]:
    """For each run of predictions, the sample index of its majority answer (None: no answer).

    Answers are grouped by normalized text first, so math-verify compares only distinct
    texts: group g asks, in one sandboxed call, which of the groups before it it equals (at
    most n - 1 comparisons, each under the per-item time limit), all runs in one batch. A
    group joins the first earlier group that opened a cluster and that it equals; the largest
    cluster wins, the first-seen on a tie.
    """
    groups = [_vote_groups(preds) for preds in runs]
    jobs = [(firsts[g], firsts[:g]) for firsts, _, _ in groups for g in range(1, len(firsts))]
    batch = score(matching_answers, jobs, default=[])
    matches = iter(batch.values)
    winners: list[int | None] = []
    for firsts, where, counts in groups:
        clusters: list[list[int]] = []  # [group that opened it, size]
        for g in range(len(firsts)):
            equal = set(next(matches)) if g else set()
            cluster = next((c for c in clusters if c[0] in equal), None)
            if cluster is None:
                clusters.append([g, counts[g]])
            else:
                cluster[1] += counts[g]
        best = max(clusters, key=lambda c: c[1], default=None)  # max keeps the first of ties
        winners.append(None if best is None else where[best[0]])
    return winners, batch


def _judge(pairs: Sequence[tuple[str, str | None]]) -> tuple[list[bool], Scored]:
    """Whether each (gold, predicted) matches under math-verify, in the sandbox, as one batch."""
    jobs = [(gold, pred) for gold, pred in pairs if pred]
    batch = score(math_equal, jobs, default=False)
    verdicts = iter(batch.values)
    return [bool(next(verdicts)) if pred else False for _, pred in pairs], batch


def majority_vote(predictions: Sequence[str | None]) -> str | None:
    """The most frequent answer (the first-seen on a tie), None when no sample has an answer.

    Two answers count as the same when their normalized text matches or math-verify (run in
    `mtrl.scoring`'s sandbox) finds them equal.
    """
    (winner,), _ = _majority_votes([predictions])
    return None if winner is None else predictions[winner]


def maj_at_k(gold: str, predictions: Sequence[str | None]) -> float:
    """1.0 when the majority answer of `predictions` equals `gold`, else 0.0."""
    winner = majority_vote(predictions)
    return 1.0 if _judge([(str(gold), winner)])[0][0] else 0.0


# ---------------------------------------------------------------------------- scoring


def _predicted(completion: str) -> str | None:
    predicted = last_boxed(completion)
    return None if predicted is None else predicted.strip()


def score_completion(gold: str, completion: str) -> tuple[str | None, bool]:
    """(the last `\\boxed{}` content or None, whether it equals `gold` under math-verify)."""
    predicted = _predicted(completion)
    return predicted, _judge([(gold, predicted)])[0][0]


def score_problems(
    benchmark: str,
    problems: Sequence[dict[str, Any]],
    completions: Sequence[Sequence[str]],
    num_tokens: Sequence[Sequence[int]] | None = None,
    truncated: Sequence[Sequence[bool]] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Score n completions per problem: (metrics without prefix, per-problem records).

    `problems[i]` has `problem` and `answer`; `completions[i]` holds its n completion texts.
    Metrics are named `avg@n`, `pass@k`, `maj@n`, ... (see the module doc), plus
    `scoring_timeouts` and `scoring_crashes`: math-verify calls that hit the sandbox's limits
    (they count as wrong, or as unequal answers in the vote).
    """
    if len(problems) != len(completions) or not problems:
        raise ValueError("score_problems: need one list of completions per problem, and some")
    n = len(completions[0])
    if n == 0 or any(len(c) != n for c in completions):
        raise ValueError("score_problems: every problem needs the same number (> 0) of completions")

    ks = pass_ks(n)
    golds = [str(row["answer"]) for row in problems]
    predictions = [[_predicted(t) for t in texts] for texts in completions]
    pairs = [(g, p) for g, preds in zip(golds, predictions, strict=True) for p in preds]
    flat, judged = _judge(pairs)
    correct = [flat[i * n : (i + 1) * n] for i in range(len(problems))]
    winners, voted = _majority_votes(predictions)
    records = []
    for i, (row, texts) in enumerate(zip(problems, completions, strict=True)):
        winner = winners[i]
        record = {
            "benchmark": benchmark,
            "index": int(row.get("index", i)),
            "problem": row["problem"],
            "answer": golds[i],
            "completions": list(texts),
            "predictions": predictions[i],
            "correct": correct[i],
            "num_correct": sum(correct[i]),
            "majority": None if winner is None else predictions[i][winner],
            "majority_correct": winner is not None and correct[i][winner],
        }
        if num_tokens is not None:
            record["num_tokens"] = [int(t) for t in num_tokens[i]]
        if truncated is not None:
            record["truncated"] = [bool(t) for t in truncated[i]]
        records.append(record)

    count = len(records)
    metrics: dict[str, float] = {f"avg@{n}": sum(r["num_correct"] for r in records) / (count * n)}
    for k in ks:
        metrics[f"pass@{k}"] = sum(pass_at_k(n, r["num_correct"], k) for r in records) / count
    metrics[f"maj@{n}"] = sum(r["majority_correct"] for r in records) / count
    metrics["boxed_rate"] = sum(p is not None for r in records for p in r["predictions"]) / (
        count * n
    )
    if num_tokens is not None:
        metrics["mean_tokens"] = sum(sum(r["num_tokens"]) for r in records) / (count * n)
    if truncated is not None:
        metrics["truncated_rate"] = sum(sum(r["truncated"]) for r in records) / (count * n)
    metrics["num_problems"] = float(count)
    metrics["scoring_timeouts"] = float(judged.timeouts + voted.timeouts)
    metrics["scoring_crashes"] = float(judged.crashes + voted.crashes)
    return metrics, records


# ---------------------------------------------------------------------------- generation


def benchmark_name(data_cfg: Any) -> str:
    """A short, MLflow-safe name for a benchmark section: aime2025, gsm8k, a task, a file stem."""
    source = str(data_cfg.source)
    if source == "reasoning_gym":
        name = str(data_cfg.task)
    elif source == "aime2025" and data_cfg.subset:
        name = f"aime2025_{data_cfg.subset}"
    elif source.lower().endswith((".jsonl", ".json", ".parquet")):
        name = Path(source).stem
    else:
        name = source.rstrip("/").rsplit("/", 1)[-1]
        if data_cfg.subset:
            name = f"{name}_{data_cfg.subset}"
    return re.sub(r"[^\w.-]", "_", name) or "benchmark"


def _render_prompt(prompt: Any, tokenizer: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, gen_eos):
        if value is None:
            continue
        for v in [value] if isinstance(value, int) else value:
            if int(v) not in ids:
                ids.append(int(v))
    return ids


def _zero3(accelerator: Any) -> bool:
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _eval_sampler(model: Any, ev: Any, seed: int, device: torch.device) -> Any:
    """The evaluation sampler of `model`, seeded with `seed`: single mode at `eval.temperature`
    and `eval.top_p` (temperature 0: top-k 1, i.e. greedy).

    Kept per model and settings so the engine `mtrl.rollout.engine_for` caches for it (static
    cache, captured graphs) serves every periodic evaluation; its generator is re-seeded.
    """
    from mtrl.sampling import MultiTemperatureConfig, MultiTemperatureSampler

    greedy = float(ev.temperature) == 0.0
    settings = (float(ev.temperature), float(ev.top_p), str(device))
    kept = _SAMPLERS.get(model)
    if kept is None or kept[0] != settings:
        config = MultiTemperatureConfig(
            mode="single",
            temperature=1.0 if greedy else float(ev.temperature),
            top_k=1 if greedy else 0,
            top_p=1.0 if greedy else float(ev.top_p),
            threshold_mode="fixed",
        )
        generator = torch.Generator(device=device)
        kept = (settings, MultiTemperatureSampler(config, generator=generator))
        _SAMPLERS[model] = kept
    kept[1].generator.manual_seed(seed)
    return kept[1]


_SAMPLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _generate(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    cfg: ExperimentConfig,
    add_special_tokens: bool,
    seed: int,
    desc: str,
    show_progress: bool,
    zero3: bool = False,
) -> tuple[list[str], list[int], list[bool]]:
    """Completion texts, token counts (EOS included) and truncation flags, one per text.

    Generation goes through `mtrl.rollout.generate`, the trainer's own path: the fast engine
    where `rollout.engine` and the device allow it, transformers `generate` otherwise.
    """
    from tqdm.auto import tqdm

    from mtrl.rollout import engine_for, generate, wants_engine

    ev = cfg.eval
    device = _model_device(model)
    eos = _eos_ids(model, tokenizer)
    sampler = _eval_sampler(model, ev, seed, device)
    max_new_tokens = int(ev.max_new_tokens)
    engine = None
    if wants_engine(cfg.rollout.engine, device, zero3):
        engine = engine_for(
            model,
            sampler,
            "eval",
            max_new_tokens=max_new_tokens,
            eos_token_ids=eos,
            pad_token_id=tokenizer.pad_token_id,
            **OmegaConf.to_object(cfg.rollout).engine_options(device),
        )
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out_texts: list[str] = []
    out_tokens: list[int] = []
    out_truncated: list[bool] = []
    batch = int(ev.batch_size)
    try:
        for start in tqdm(
            range(0, len(texts), batch),
            desc=desc,
            unit="batch",
            disable=not show_progress,
            dynamic_ncols=True,
        ):
            chunk = texts[start : start + batch]
            real = len(chunk)
            if engine is not None:
                # The engine captures one CUDA graph per batch size: a short last batch is
                # filled with repeats of its last prompt (outputs dropped) to reuse the graph.
                chunk = chunk + chunk[-1:] * (batch - real)
            enc = tokenizer(
                chunk,
                return_tensors="pt",
                padding=True,
                add_special_tokens=add_special_tokens,
            ).to(device)
            out = generate(
                model,
                enc["input_ids"],
                enc["attention_mask"],
                sampler=sampler,
                max_new_tokens=max_new_tokens,
                eos_token_ids=eos,
                pad_token_id=tokenizer.pad_token_id,
                engine=engine,
            )
            out_ids, lengths = out.completion_ids[:real], out.lengths[:real]
            last = out_ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
            done = (lengths > 0) & torch.isin(last, torch.tensor(eos or [-1], device=last.device))
            for row, length, ended in zip(
                out_ids.tolist(), lengths.tolist(), done.tolist(), strict=True
            ):
                text_tokens = row[: length - 1] if ended else row[:length]
                out_texts.append(tokenizer.decode(text_tokens, skip_special_tokens=True))
                out_tokens.append(int(length))
                out_truncated.append(not ended)
    finally:
        tokenizer.padding_side = padding_side
    return out_texts, out_tokens, out_truncated


def default_output_file(cfg: ExperimentConfig, step: int | None = None) -> Path:
    """`eval.output_file` (`{step}` in it is filled in), else <output_dir>/eval/<step or final>.json.

    During training (`step` given) a file name without `{step}` gets `_step<N>` appended, so
    evaluations do not overwrite each other.
    """
    name = cfg.eval.output_file
    if name:
        if "{step}" in name:
            return Path(name.replace("{step}", str(step if step is not None else "final")))
        path = Path(name)
        return path if step is None else path.with_name(f"{path.stem}_step{step}{path.suffix}")
    output_dir = cfg.train.get("output_dir") or str(Path("outputs") / cfg.name)
    leaf = "eval.json" if step is None else f"step_{step:06d}.json"
    return Path(output_dir) / "eval" / leaf


def evaluate(
    model: Any,
    tokenizer: Any,
    cfg: ExperimentConfig,
    step: int | None = None,
    *,
    output_file: str | Path | None = None,
    write: bool = True,
    seed: int | None = None,
    accelerator: Any = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Evaluate `model` on every benchmark of `cfg.eval`; write the JSON; return the result.

    Returns `{"step", "model", "settings", "metrics", "benchmarks", "records", "output_file",
    "seconds"}`; `metrics` is flat (`eval/<bench>/avg@n`, ...), `benchmarks` holds the same
    per benchmark without the prefix, `records` one dict per problem. `output_file` defaults
    to `default_output_file(cfg, step)`; `write=False` skips the file. `seed` (default
    `train.seed`, else 0) seeds the sampler. With an `accelerator` of several processes, each
    generates a share of the problems and all get the gathered result (the main process
    writes the file); every process must call it.
    """
    from mtrl.data import drop_overlap, load_prompts

    if not cfg.eval.benchmarks:
        raise ValueError("eval.benchmarks: name at least one benchmark to evaluate on")
    train_set = load_prompts(cfg.data, tokenizer)  # held-out means: none of these problems
    rank, world = 0, 1
    if accelerator is not None:
        rank, world = accelerator.process_index, accelerator.num_processes
    if seed is None:
        seed = int(cfg.train.get("seed", 0) or 0)
    n = int(cfg.eval.num_samples)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    metrics: dict[str, float] = {}
    per_bench: dict[str, dict[str, float]] = {}
    records: list[dict[str, Any]] = []
    names: list[str] = []
    try:
        for b, bench in enumerate(cfg.eval.benchmarks):
            name = benchmark_name(bench)
            if name in names:
                name = f"{name}_{b}"
            names.append(name)
            dataset, dropped = drop_overlap(load_prompts(bench, tokenizer), train_set)
            if dropped:
                logger.info("eval %s: dropped %d problem(s) of the training set", name, dropped)
            if len(dataset) == 0:
                raise ValueError(f"eval.benchmarks[{b}]: every problem is in the training set")
            if cfg.eval.max_problems is not None:
                dataset = dataset.select(range(min(len(dataset), int(cfg.eval.max_problems))))
            problems = [
                {"index": i, "problem": p, "answer": a, "prompt": q}
                for i, (p, a, q) in enumerate(
                    zip(dataset["problem"], dataset["answer"], dataset["prompt"], strict=True)
                )
            ]
            mine = problems[rank::world]
            texts = [_render_prompt(p["prompt"], tokenizer) for p in mine for _ in range(n)]
            add_special = bench.prompt_format == "text"
            outputs = (
                _generate(
                    model,
                    tokenizer,
                    texts,
                    cfg,
                    add_special,
                    seed + 1000 * b + rank,
                    desc=f"eval {name}",
                    show_progress=show_progress and rank == 0,
                    zero3=_zero3(accelerator),
                )
                if texts
                else ([], [], [])
            )
            shards = [
                {
                    "index": p["index"],
                    "completions": outputs[0][j * n : (j + 1) * n],
                    "tokens": outputs[1][j * n : (j + 1) * n],
                    "truncated": outputs[2][j * n : (j + 1) * n],
                }
                for j, p in enumerate(mine)
            ]
            if world > 1:
                from accelerate.utils import gather_object

                shards = gather_object(shards)
            shards.sort(key=lambda s: s["index"])
            bench_metrics, bench_records = score_problems(
                name,
                [problems[s["index"]] for s in shards],
                [s["completions"] for s in shards],
                [s["tokens"] for s in shards],
                [s["truncated"] for s in shards],
            )
            bench_metrics["dropped_overlap"] = float(dropped)
            per_bench[name] = bench_metrics
            metrics.update({f"eval/{name}/{k}": v for k, v in bench_metrics.items()})
            records += bench_records
    finally:
        if was_training:
            model.train()
    result: dict[str, Any] = {
        "step": step,
        "model": str(cfg.model.name),
        "settings": {
            "num_samples": n,
            "temperature": float(cfg.eval.temperature),
            "top_p": float(cfg.eval.top_p),
            "max_new_tokens": int(cfg.eval.max_new_tokens),
            "batch_size": int(cfg.eval.batch_size),
            "max_problems": cfg.eval.max_problems,
            "seed": seed,
            "scoring": "last \\boxed{} vs gold answer, math-verify",
        },
        "metrics": metrics,
        "benchmarks": per_bench,
        "records": records,
        "seconds": time.perf_counter() - started,
        "output_file": None,
    }
    if write:
        path = Path(output_file) if output_file is not None else default_output_file(cfg, step)
        result["output_file"] = str(path)
        if rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False))
            tmp.replace(path)
    return result


# ---------------------------------------------------------------------------- reporting


def mlflow_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """MLflow-valid names: `eval/gsm8k/avg@4` -> `eval/gsm8k/avg_at_4`; non-finite values dropped."""
    out = {}
    for key, value in metrics.items():
        name = re.sub(r"[^\w./ :-]", "_", key.replace("@", "_at_"))
        if isinstance(value, int | float) and math.isfinite(value):
            out[name] = float(value)
    return out


def display_name(metric: str) -> str:
    """The inverse of `mlflow_metrics` for display: `pass_at_4` -> `pass@4`."""
    return re.sub(r"_at_(\d+)", r"@\1", metric)


def log_to_mlflow(
    result: dict[str, Any],
    run_id: str,
    tracking_uri: str | None = None,
    step: int | None = None,
    artifact_path: str = "eval",
) -> None:
    """Log an `evaluate` result to an existing MLflow run: metrics at `step` (default: the
    result's step, else 0) and the JSON file as an artifact under `artifact_path`."""
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(tracking_uri) if tracking_uri else mlflow.MlflowClient()
    if step is None:
        step = result.get("step") or 0
    now = int(time.time() * 1000)
    entries = [Metric(k, v, now, int(step)) for k, v in mlflow_metrics(result["metrics"]).items()]
    for i in range(0, len(entries), 1000):
        client.log_batch(run_id, metrics=entries[i : i + 1000])
    path = result.get("output_file")
    if path and Path(path).is_file():
        client.log_artifact(run_id, path, artifact_path)


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table: one row per benchmark, one column per metric."""
    rows = result["benchmarks"]
    if not rows:
        return "(no benchmarks)"
    columns: list[str] = []
    for metrics in rows.values():
        columns += [c for c in metrics if c not in columns]
    width = max(9, *(len(b) for b in rows))
    widths = [max(10, len(display_name(c))) for c in columns]
    header = f"{'benchmark':<{width}}  " + "  ".join(
        f"{display_name(c):>{w}}" for c, w in zip(columns, widths, strict=True)
    )
    lines = [header, "-" * len(header)]
    for bench, metrics in rows.items():
        cells = []
        for c, w in zip(columns, widths, strict=True):
            v = metrics.get(c)
            if v is None:
                cells.append(" " * w)
            elif c == "num_problems":
                cells.append(f"{int(v):>{w}d}")
            elif c == "mean_tokens":
                cells.append(f"{v:>{w}.1f}")
            else:
                cells.append(f"{v:>{w}.4f}")
        lines.append(f"{bench:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- training


class EvalCallback(TrainerCallback):
    """Evaluates during training every `eval.every_n_steps` optimizer steps.

    Wiring (after building the trainer)::

        if cfg.eval.every_n_steps and cfg.eval.benchmarks:
            trainer.add_callback(EvalCallback(cfg, trainer))

    - at the first step of a fresh run (`global_step == 0`, before any update) the base model
      is evaluated when `at_start` is true; a resumed run skips that;
    - after optimizer step s when s % every_n_steps == 0, and after the last step;
    - every process takes part (each generates a share of the problems: DDP and ZeRO-3 work);
    - the metrics go through `transformers.Trainer.log` (MLflow-safe names, see
      `mlflow_metrics`), so every logging callback, the MLflow one included, records them at
      that step, and `trainer.state.log_history` holds them. GRPO's own averaged training
      metrics are not touched.
    - the JSON of each evaluation goes to `<output_dir>/eval/step_<N>.json` (or
      `eval.output_file` with `{step}`).
    """

    def __init__(self, cfg: ExperimentConfig, trainer: Any = None, at_start: bool = True):
        self.cfg = cfg
        self.trainer = trainer
        self.at_start = at_start
        self.every = int(cfg.eval.every_n_steps)
        self.results: list[dict[str, Any]] = []  # metrics of each evaluation, with its step
        self._started = False
        self._last_step: int | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._started:
            return
        self._started = True
        if self.at_start and state.global_step == 0:
            self._evaluate(args, state)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        due = self.every > 0 and step % self.every == 0
        last = state.max_steps > 0 and step >= state.max_steps
        if (due or (last and self.every > 0)) and step != self._last_step:
            self._evaluate(args, state)

    def _evaluate(self, args, state) -> None:
        trainer = self.trainer
        if trainer is None:
            raise RuntimeError("EvalCallback: set .trainer (or pass it) before training")
        from transformers import Trainer
        from trl.models import unwrap_model_for_generation

        step = state.global_step
        self._last_step = step
        output_file = None
        if not self.cfg.eval.output_file:
            output_file = Path(args.output_dir) / "eval" / f"step_{step:06d}.json"
        accelerator = trainer.accelerator
        with unwrap_model_for_generation(
            trainer.model_wrapped,
            accelerator,
            gather_deepspeed3_params=getattr(args, "ds3_gather_for_generation", True),
        ) as model:
            result = evaluate(
                model,
                trainer.processing_class,
                self.cfg,
                step=step,
                output_file=output_file,
                accelerator=accelerator,
                show_progress=accelerator.is_main_process,
            )
        metrics = mlflow_metrics(result["metrics"])
        metrics["eval/seconds"] = float(result["seconds"])
        self.results.append({"step": step, **metrics})
        if accelerator.is_main_process:
            logger.info(
                "eval at step %d: %s",
                step,
                ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "_at_" in k),
            )
        # Trainer.log runs the callbacks' on_log, which clears control.should_log: restore it,
        # or the step's own training log (loss, grad_norm, learning_rate) is dropped.
        should_log = trainer.control.should_log
        Trainer.log(trainer, dict(metrics))
        trainer.control.should_log = should_log
