"""Compare MLflow runs: `python launch/compare.py --experiment NAME [NAME ...] [--out DIR]`.

Runs come from experiments (`--experiment`) or ids (`--runs`) in a tracking store
(`--tracking-uri`, default sqlite:///mlflow.db). They are grouped by a label: by default the
sampler setting (`sampler.mode` and its key parameters, rollout offsets), or any param or tag
(`--group-by param.train.learning_rate`, `--group-by tag.mlflow.runName`). Runs of one group
are repeats (typically different `train.seed`). The report folder (`--out`, default
reports/<name>) gets PNG figures against the training step, each group's mean as a line and
the spread across its runs as a band (min-max, or +-1 std with `--band std`):

- reward.png          `reward` (GRPO's mean reward of the rollouts)
- heldout.png         held-out accuracy: `eval/<bench>/avg_at_n`, `maj_at_n`, largest `pass_at_k`
- reasoning_share.png `sampler/reasoning_share`
- temperatures.png    `sampler/reasoning/temperature_mean` and `sampler/knowledge/...`
- entropy.png         `sampler/entropy_mean`

and report.md: a table of each group's final values (mean +- std over its runs) and the figures.

A run counts only when it finished: MLflow status FINISHED and a held-out evaluation at its
final step (`train.max_steps`). Others (FAILED, KILLED, still RUNNING because the process
died, or no final evaluation) are listed as failed with the reason and left out of every
mean, figure and difference; the table shows n per group. With a baseline group (`--baseline
LABEL`, default `single T=1.0` when present) each other group gets the paired, by-seed
difference of its final values against the baseline's runs of the same seeds, with a 95%
percentile-bootstrap interval over seeds (10,000 resamples, fixed RNG seed), and a sentence
that says only what the interval supports.

A training resumed after a crash may go on in a new run (mtrl.tracking): the new run holds a
copy of the old one's history up to the checkpoint and carries the tag `mtrl.resumed_from`;
the old run carries `mtrl.continued_in` (and ends KILLED). The training counts once, as its
continuation: a run tagged `mtrl.continued_in` is left out of every mean, figure, difference
and failure count and listed as "continued in <run name>" (the continuation is judged like
any run; one not among the compared runs is named by its id).

An http(s) tracking server that does not answer ends the program within seconds with one
line (MLflow's own client would retry for minutes).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REWARD = "reward"
REASONING_SHARE = "sampler/reasoning_share"
TEMPERATURES = ("sampler/reasoning/temperature_mean", "sampler/knowledge/temperature_mean")
ENTROPY = "sampler/entropy_mean"
HELDOUT = re.compile(r"^eval/[^/]+/(avg_at_\d+|maj_at_\d+|pass_at_\d+)$")
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed in advance: the same data always gives the same interval
CONTINUED_IN = "mtrl.continued_in"  # mtrl.tracking.CONTINUED_IN: "<run id>[ in <store>]"


@dataclass
class Run:
    run_id: str
    name: str
    experiment: str
    params: dict[str, str]
    tags: dict[str, str]
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    status: str = "FINISHED"  # MLflow's run status
    last_logged_ms: int = 0  # the latest metric timestamp (ms since the epoch)

    @property
    def seed(self) -> str:
        return self.params.get("train.seed", "?")


def final_step(run: Run) -> int | None:
    """The step a finished run ends at: `train.max_steps` when set (> 0)."""
    try:
        steps = int(float(run.params.get("train.max_steps", "")))
    except ValueError:
        return None
    return steps if steps > 0 else None


def failure(run: Run, now_ms: int) -> str | None:
    """Why `run` does not count (None when it does): not FINISHED, or no final evaluation."""
    if run.status in ("FAILED", "KILLED"):
        return f"MLflow status {run.status}"
    if run.status != "FINISHED":
        age = (now_ms - run.last_logged_ms) / 60_000 if run.last_logged_ms else math.inf
        return f"status {run.status}, last metric {age:.0f} min ago (process dead or not done)"
    evals = [k for k in run.histories if HELDOUT.match(k)]
    if not evals:
        return "no held-out evaluation logged"
    last = max(h[-1][0] for k in evals if (h := run.histories[k]))
    end = final_step(run)
    if end is not None and last < end:
        return f"no evaluation at the final step {end} (last at step {last})"
    return None


def continuation(run: Run, by_id: dict[str, Run]) -> str | None:
    """Where `run`'s training went on ("<run name> (`<id>`)", or the tag's text when that run
    is not among `by_id`), None when it was not continued in another run."""
    tag = run.tags.get(CONTINUED_IN)
    if not tag:
        return None
    successor = by_id.get(tag.split()[0])
    return f"{successor.name} (`{successor.run_id}`)" if successor else f"run {tag}"


# ---------------------------------------------------------------------------- reading


def load_runs(client: Any, experiments: list[str], run_ids: list[str]) -> list[Run]:
    """The runs named by experiment or id, with every metric's history, sorted by start time."""
    found = []
    if experiments:
        ids, names = [], {}
        for name in experiments:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise SystemExit(f"error: --experiment: no experiment named '{name}'")
            ids.append(exp.experiment_id)
            names[exp.experiment_id] = name
        token = None
        while True:
            page = client.search_runs(ids, max_results=1000, page_token=token)
            found += [(r, names[r.info.experiment_id]) for r in page]
            token = page.token
            if not token:
                break
    for run_id in run_ids:
        try:
            run = client.get_run(run_id)
        except Exception as exc:
            raise SystemExit(f"error: --runs: cannot read run {run_id}: {exc}") from None
        exp = client.get_experiment(run.info.experiment_id)
        found.append((run, exp.name))
    runs, seen = [], set()
    for run, exp_name in sorted(found, key=lambda x: x[0].info.start_time or 0):
        if run.info.run_id in seen:
            continue
        seen.add(run.info.run_id)
        item = Run(
            run_id=run.info.run_id,
            name=run.info.run_name or run.info.run_id[:8],
            experiment=exp_name,
            params=dict(run.data.params),
            tags=dict(run.data.tags),
            status=str(run.info.status),
            last_logged_ms=int(run.info.start_time or 0),
        )
        for key in run.data.metrics:
            history = client.get_metric_history(run.info.run_id, key)
            points: dict[int, float] = {}
            for m in sorted(history, key=lambda m: (m.step, m.timestamp)):
                points[int(m.step)] = float(m.value)  # the latest value logged at a step wins
                item.last_logged_ms = max(item.last_logged_ms, int(m.timestamp))
            item.histories[key] = sorted(points.items())
        runs.append(item)
    return runs


def sampler_label(params: dict[str, str]) -> str:
    """`single T=1.0`, `multi p=0.2 T=1.2/0.8`, with schedules and rollout offsets noted."""
    mode = params.get("sampler.mode")
    if mode is None:
        return "?"

    def sched(name: str) -> str:
        kind = params.get(f"sampler.{name}_schedule.kind", "constant")
        if kind == "constant":
            return ""
        end = params.get(f"sampler.{name}_schedule.end")
        return f"->{end}" if end not in (None, "None") else f"({kind})"

    if mode == "single":
        label = f"single T={params.get('sampler.temperature', '?')}{sched('temperature')}"
    else:
        label = (
            f"multi p={params.get('sampler.reasoning_fraction', '?')}"
            f"{sched('reasoning_fraction')} "
            f"T={params.get('sampler.high_temperature', '?')}{sched('high_temperature')}"
            f"/{params.get('sampler.low_temperature', '?')}{sched('low_temperature')}"
        )
        threshold = params.get("sampler.threshold_mode")
        if threshold and threshold != "window":
            label += f" {threshold}"
    values = params.get("sampler.rollout_offset_values")
    if values not in (None, "None"):
        label += f" offsets={values}"
    elif params.get("sampler.rollout_offsets") == "True":
        label += f" offsets+-{params.get('sampler.rollout_offset_step', '?')}"
    return label


def group_label(run: Run, group_by: str | None) -> str:
    """The group of a run: its sampler setting, `arm` (its name without `-s<seed>`), a param
    or a tag."""
    if not group_by:
        label = sampler_label(run.params)
        return label if label != "?" else run.name
    if group_by == "arm":
        return re.sub(r"-s\d+$", "", run.name)
    kind, _, key = group_by.partition(".")
    if kind == "tag":
        return f"{key}={run.tags.get(key, '?')}"
    if kind != "param":
        key = group_by
    return f"{key}={run.params.get(key, '?')}"


# ---------------------------------------------------------------------------- statistics


def smooth(points: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """Trailing moving average over `window` logged points (1: unchanged)."""
    if window <= 1:
        return points
    out = []
    for i, (step, _) in enumerate(points):
        chunk = [v for _, v in points[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        out.append((step, sum(chunk) / len(chunk) if chunk else math.nan))
    return out


def aggregate(histories: list[list[tuple[int, float]]]) -> dict[str, list[float]]:
    """Per step over the runs that logged it: mean, std (sample; 0 for one run), min, max, n."""
    by_step: dict[int, list[float]] = {}
    for history in histories:
        for step, value in history:
            if math.isfinite(value):
                by_step.setdefault(step, []).append(value)
    out: dict[str, list[float]] = {k: [] for k in ("step", "mean", "std", "min", "max", "n")}
    for step in sorted(by_step):
        values = by_step[step]
        out["step"].append(step)
        out["mean"].append(statistics.fmean(values))
        out["std"].append(statistics.stdev(values) if len(values) > 1 else 0.0)
        out["min"].append(min(values))
        out["max"].append(max(values))
        out["n"].append(len(values))
    return out


def final_value(history: list[tuple[int, float]], window: int = 1) -> float | None:
    """Mean of the last `window` finite values of a history, None when it has none."""
    values = [v for _, v in history if math.isfinite(v)][-window:]
    return statistics.fmean(values) if values else None


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_bootstrap(
    diffs: list[float],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of paired differences and its percentile-bootstrap interval.

    Resamples the n differences (one per seed) with replacement `resamples` times; the bounds
    are the (1 - level) / 2 and (1 + level) / 2 quantiles of the resampled means. One
    difference gives (d, d, d): no interval.
    """
    import numpy as np

    if not diffs:
        raise ValueError("paired_bootstrap: no paired differences")
    values = np.asarray(diffs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(values.mean()), float(low), float(high)


def paired_t_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of paired differences and its Student-t interval, the
    check on paired_bootstrap for few seeds (a percentile bootstrap of 5 values is too
    narrow: it treats the sample's spread as known). Needs at least 2 differences."""
    import numpy as np
    from scipy import stats  # scipy comes with mlflow

    if len(diffs) < 2:
        raise ValueError("paired_t_interval: needs at least 2 paired differences")
    values = np.asarray(diffs, dtype=np.float64)
    half = stats.t.ppf((1 + level) / 2, len(values) - 1) * stats.sem(values)
    return float(values.mean()), float(values.mean() - half), float(values.mean() + half)


def run_final(run: Run, key: str, window: int = 1) -> float | None:
    """A run's final value of `key`: its last evaluation, or the mean of its last `window`
    logged training steps."""
    return final_value(run.histories.get(key, []), window if not key.startswith("eval/") else 1)


def paired_differences(
    runs: list[Run], baseline: list[Run], key: str, window: int = 1
) -> list[tuple[str, float]]:
    """(seed, run's final `key` minus the baseline run's of the same seed), seeds in order.

    Seeds without a value on both sides are left out; a seed with several runs on one side is
    an error (pairing would be ambiguous).
    """

    def by_seed(group: list[Run]) -> dict[str, float]:
        out: dict[str, float] = {}
        for run in group:
            if run.seed in out:
                raise ValueError(f"two runs of seed {run.seed} in one group ({run.name})")
            value = run_final(run, key, window)
            if value is not None:
                out[run.seed] = value
        return out

    mine, base = by_seed(runs), by_seed(baseline)
    seeds = sorted(set(mine) & set(base), key=lambda s: (len(s), s))
    return [(s, mine[s] - base[s]) for s in seeds]


def verdict(
    label: str,
    baseline: str,
    metric: str,
    diff: tuple[float, float, float],
    n: int,
    level: float = 0.95,
) -> str:
    """One sentence that says no more than the interval (`level`, as from paired_bootstrap):
    higher, lower or no detectable difference (the interval holds 0); values in percentage
    points."""
    mean, low, high = (100 * v for v in diff)
    interval = (
        f"{mean:+.1f} points, {100 * level:.4g}% CI [{low:+.1f}, {high:+.1f}], {n} paired seeds"
    )
    if n < 2:
        return (
            f"{label} vs {baseline} on {metric}: one paired seed only, no interval ({mean:+.1f})."
        )
    if low > 0:
        return f"{label} scored higher than {baseline} on {metric} ({interval})."
    if high < 0:
        return f"{label} scored lower than {baseline} on {metric} ({interval})."
    return f"{label} vs {baseline} on {metric}: no detectable difference ({interval})."


# ---------------------------------------------------------------------------- figures


def plot_metric(
    ax: Any,
    groups: dict[str, list[Run]],
    key: str,
    band: str,
    smoothing: int,
    colors: dict[str, Any],
    linestyle: str = "-",
    suffix: str = "",
) -> bool:
    drew = False
    for label, runs in groups.items():
        histories = [smooth(r.histories[key], smoothing) for r in runs if r.histories.get(key)]
        if not histories:
            continue
        agg = aggregate(histories)
        if not agg["step"]:
            continue
        color = colors[label]
        marker = "o" if len(agg["step"]) <= 20 else None
        ax.plot(
            agg["step"],
            agg["mean"],
            linestyle,
            color=color,
            marker=marker,
            markersize=3,
            label=f"{label}{suffix} (n={len(histories)})",
        )
        if band == "std":
            low = [m - s for m, s in zip(agg["mean"], agg["std"], strict=True)]
            high = [m + s for m, s in zip(agg["mean"], agg["std"], strict=True)]
        else:
            low, high = agg["min"], agg["max"]
        if len(histories) > 1:
            ax.fill_between(agg["step"], low, high, color=color, alpha=0.2, linewidth=0)
        drew = True
    return drew


def figure(
    path: Path,
    groups,
    keys: list[str],
    titles: list[str],
    band: str,
    smoothing: int,
    colors,
    ylabel: str = "",
) -> bool:
    """One subplot per key; False (and no file) when no run has any of the keys."""
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    drew_any = False
    for ax, key, title in zip(axes.flat, keys, titles, strict=False):
        drew = plot_metric(ax, groups, key, band, smoothing, colors)
        drew_any |= drew
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if ylabel:
            ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drew:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    if drew_any:
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drew_any


def temperature_figure(path: Path, groups, band: str, smoothing: int, colors) -> bool:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    drew = plot_metric(ax, groups, TEMPERATURES[0], band, smoothing, colors, "-", " reasoning")
    drew |= plot_metric(ax, groups, TEMPERATURES[1], band, smoothing, colors, "--", " knowledge")
    ax.set_title(
        "sampling temperature per token class (solid: reasoning, dashed: knowledge)", fontsize=9
    )
    ax.set_xlabel("step")
    ax.set_ylabel("mean temperature")
    ax.grid(alpha=0.3)
    if drew:
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drew


# ---------------------------------------------------------------------------- report


def display(metric: str) -> str:
    return re.sub(r"_at_(\d+)", r"@\1", metric)


def heldout_keys(runs: list[Run]) -> list[str]:
    """Held-out metrics to show: per benchmark avg@n, the largest pass@k, maj@n."""
    keys = sorted({k for r in runs for k in r.histories if HELDOUT.match(k)})
    out = []
    for bench in sorted({k.split("/")[1] for k in keys}):
        mine = [k for k in keys if k.split("/")[1] == bench]
        avg = [k for k in mine if "/avg_at_" in k]
        maj = [k for k in mine if "/maj_at_" in k]
        passes = sorted(
            (k for k in mine if "/pass_at_" in k), key=lambda k: int(k.rsplit("_", 1)[1])
        )
        largest = [k for k in passes[-1:] if not k.endswith("_at_1")]  # pass@1 is avg@n
        out += avg + largest + maj
        if not avg and passes:
            out.append(passes[0])
    return list(dict.fromkeys(out))


def cell(values: list[float], start: list[float] | None = None, digits: int = 3) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    text = f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"
    if start:
        text += f" (from {statistics.fmean(start):.{digits}f})"
    return text


def table(
    groups: dict[str, list[Run]],
    eval_keys: list[str],
    reward_window: int,
    failed: dict[str, list[tuple[Run, str]]],
) -> list[str]:
    """Each group's final values over its finished runs (n), and how many failed."""
    header = ["group", "n", "failed", "seeds", f"final reward (last {reward_window})"]
    header += [display(k.removeprefix("eval/")) for k in eval_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in dict.fromkeys([*groups, *failed]):
        runs = groups.get(label, [])
        rewards = [final_value(r.histories.get(REWARD, []), reward_window) for r in runs]
        row = [
            label.replace("|", "\\|"),
            str(len(runs)),
            str(len(failed.get(label, []))),
            ", ".join(sorted({r.seed for r in runs}, key=lambda s: (len(s), s))),
            cell([v for v in rewards if v is not None]),
        ]
        for key in eval_keys:
            finals = [final_value(r.histories.get(key, [])) for r in runs]
            starts = [
                h[0][1] for r in runs if (h := r.histories.get(key)) and h[0][0] == 0 and len(h) > 1
            ]
            row.append(cell([v for v in finals if v is not None], starts or None))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def paired_keys(runs: list[Run], eval_keys: list[str]) -> list[str]:
    """The metrics compared by seed: per benchmark avg@n (the primary: the first), the largest
    pass@k, boxed rate and mean completion tokens; then the mean token entropy of rollouts."""
    keys = []
    for key in eval_keys:
        bench = key.split("/")[1]
        if "/avg_at_" in key or "/pass_at_" in key:
            keys.append(key)
        if "/avg_at_" in key:
            keys += [f"eval/{bench}/boxed_rate", f"eval/{bench}/mean_tokens"]
    keys = [k for k in dict.fromkeys(keys) if any(k in r.histories for r in runs)]
    keys = [k for k in keys if "/avg_at_" in k] + [k for k in keys if "/avg_at_" not in k]
    if any(ENTROPY in r.histories for r in runs):
        keys.append(ENTROPY)
    return keys


def paired_table(
    groups: dict[str, list[Run]], baseline: str, keys: list[str], reward_window: int
) -> tuple[list[str], list[str]]:
    """(table lines, verdict sentences): each group minus the baseline, by seed, per metric:
    mean difference [95% bootstrap CI] (n seeds). Verdicts for the primary metric (keys[0])."""
    header = ["group", *(f"Δ {display(k.removeprefix('eval/'))}" for k in keys)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    verdicts = []
    for label, runs in groups.items():
        if label == baseline:
            continue
        row = [label.replace("|", "\\|")]
        for i, key in enumerate(keys):
            diffs = [d for _, d in paired_differences(runs, groups[baseline], key, reward_window)]
            if not diffs:
                row.append("-")
                continue
            mean, low, high = paired_bootstrap(diffs)
            row.append(f"{mean:+.3f} [{low:+.3f}, {high:+.3f}] (n={len(diffs)})")
            if i == 0:
                metric = display(key.removeprefix("eval/"))
                verdicts.append(verdict(label, baseline, metric, (mean, low, high), len(diffs)))
        lines.append("| " + " | ".join(row) + " |")
    return lines, verdicts


def write_report(
    runs: list[Run],
    out: Path,
    title: str,
    tracking_uri: str,
    group_by: str | None,
    band: str,
    smoothing: int,
    reward_window: int,
    baseline: str | None = None,
    now_ms: int | None = None,
    failures: dict[str, str] | None = None,
) -> Path:
    """Figures and report.md for `runs` in `out`; failed and continued runs listed, left out of
    the rest.

    `baseline`: the group every other is compared with by seed (default: `single T=1.0` when
    such a group exists). `now_ms` (default: now) dates how long a RUNNING run has been silent.
    `failures`: run id -> reason, for failures the caller knows of (an exit status).
    """
    import time

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    groups: dict[str, list[Run]] = {}
    failed: dict[str, list[tuple[Run, str]]] = {}
    continued: list[tuple[str, Run, str]] = []  # (group, run, its continuation)
    by_id = {r.run_id: r for r in runs}
    for run in runs:
        label = group_label(run, group_by)
        if (successor := continuation(run, by_id)) is not None:
            continued.append((label, run, successor))
            continue
        reason = (failures or {}).get(run.run_id) or failure(run, now_ms)
        if reason is None:
            groups.setdefault(label, []).append(run)
        else:
            failed.setdefault(label, []).append((run, reason))
    ok_runs = [r for members in groups.values() for r in members]
    if baseline is None and "single T=1.0" in groups:
        baseline = "single T=1.0"
    cmap = plt.get_cmap("tab10")
    colors = {label: cmap(i % 10) for i, label in enumerate(dict.fromkeys([*groups, *failed]))}
    eval_keys = heldout_keys(ok_runs)
    figures: list[tuple[str, str]] = []
    missing: list[str] = []

    def add(name: str, caption: str, drew: bool) -> None:
        if drew:
            figures.append((name, caption))
        else:
            (out / name).unlink(missing_ok=True)
            missing.append(caption)

    smoothed = f" ({smoothing}-point moving average)" if smoothing > 1 else ""
    add(
        "reward.png",
        f"Reward{smoothed}",
        figure(
            out / "reward.png",
            groups,
            [REWARD],
            [f"reward{smoothed}"],
            band,
            smoothing,
            colors,
            "mean reward",
        ),
    )
    add(
        "heldout.png",
        "Held-out accuracy",
        bool(eval_keys)
        and figure(
            out / "heldout.png",
            groups,
            eval_keys,
            [display(k.removeprefix("eval/")) for k in eval_keys],
            band,
            1,
            colors,
            "accuracy",
        ),
    )
    add(
        "reasoning_share.png",
        "Reasoning-token share",
        figure(
            out / "reasoning_share.png",
            groups,
            [REASONING_SHARE],
            ["share of completion tokens classified as reasoning"],
            band,
            smoothing,
            colors,
        ),
    )
    add(
        "temperatures.png",
        "Temperatures per token class",
        temperature_figure(out / "temperatures.png", groups, band, smoothing, colors),
    )
    add(
        "entropy.png",
        "Token entropy",
        figure(
            out / "entropy.png",
            groups,
            [ENTROPY],
            ["mean token entropy (nats, T = 1)"],
            band,
            smoothing,
            colors,
        ),
    )

    spread = "±1 std" if band == "std" else "min-max"
    n_failed = sum(len(v) for v in failed.values())
    lines = [
        f"# {title}",
        "",
        f"{len(runs)} runs from `{tracking_uri}`, grouped by "
        f"{f'`{group_by}`' if group_by else 'sampler setting'}; runs of a group are repeats "
        f"(seeds). {len(ok_runs)} finished; {n_failed} failed and are left out of every mean, "
        f"figure and difference (listed below)"
        + (
            f"; {len(continued)} went on in a continuation run after a resume and count once, "
            "as that run"
            if continued
            else ""
        )
        + f". Lines: mean over a group's finished runs; bands: {spread} across them.",
        "",
        f"Table: n finished runs per group; mean ± std (sample std over runs) of each run's "
        f"final value; reward is the mean of its last {reward_window} logged steps, held-out "
        f"metrics the last evaluation (in parentheses: the model at step 0, where evaluated).",
        "",
        *table(groups, eval_keys, reward_window, failed),
        "",
    ]
    if baseline in groups and len(groups) > 1:
        keys = paired_keys(ok_runs, eval_keys)
        if keys:
            rows, verdicts = paired_table(groups, baseline, keys, reward_window)
            lines += [
                f"## Paired differences against {baseline}",
                "",
                f"Per seed: a group's final value minus the {baseline} run of the same seed; "
                f"mean over seeds [95% percentile bootstrap interval over seeds, "
                f"{BOOTSTRAP_RESAMPLES:,} resamples, RNG seed {BOOTSTRAP_SEED}] (n paired "
                f"seeds). Primary: {display(keys[0].removeprefix('eval/'))}.",
                "",
                *rows,
                "",
                *[f"- {v}" for v in verdicts],
                "",
            ]
    for name, caption in figures:
        lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
    if missing:
        lines += ["No data for: " + ", ".join(missing) + ".", ""]
    if failed:
        lines += ["## Failed runs (left out)", "", "| group | run | seed | reason | run id |"]
        lines.append("|---|---|---|---|---|")
        for label, members in failed.items():
            for r, reason in members:
                lines.append(
                    f"| {label.replace('|', chr(92) + '|')} | {r.name} | {r.seed} | {reason} | "
                    f"`{r.run_id}` |"
                )
        lines.append("")
    if continued:
        lines += [
            "## Continued runs (counted once, as their continuation)",
            "",
            "| group | run | seed | continued in | run id |",
            "|---|---|---|---|---|",
        ]
        for label, r, successor in continued:
            lines.append(
                f"| {label.replace('|', chr(92) + '|')} | {r.name} | {r.seed} | "
                f"continued in {successor} | `{r.run_id}` |"
            )
        lines.append("")
    lines += [
        "## Runs",
        "",
        "| group | run | experiment | seed | run id |",
        "|---|---|---|---|---|",
    ]
    for label, members in groups.items():
        for r in members:
            lines.append(
                f"| {label.replace('|', chr(92) + '|')} | {r.name} | {r.experiment} | "
                f"{r.seed} | `{r.run_id}` |"
            )
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def check_reachable(uri: str, timeout: float = 5.0, key: str = "--tracking-uri") -> None:
    """Raise SystemExit with one line when an http(s) tracking server does not answer.

    `key` names where the URI came from in that line (launch/eval.py: `tracking.uri`). Also
    caps MLflow's own HTTP retries and timeout for this process, so that a server that dies
    mid-way fails in seconds too.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # it answered: a server without /health is still a server
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SystemExit(f"error: {key}: no MLflow server answers at {uri} ({reason})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", nargs="+", default=[], help="MLflow experiment names")
    parser.add_argument("--runs", nargs="+", default=[], help="MLflow run ids")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument(
        "--group-by",
        help="param.<key>, tag.<key> or arm (run name without -s<seed>); default: sampler setting",
    )
    parser.add_argument(
        "--baseline", help="group compared with by seed (default: 'single T=1.0' when present)"
    )
    parser.add_argument("--out", help="report folder (default: reports/<name>)")
    parser.add_argument("--name", help="report name (default: the experiment names)")
    parser.add_argument("--band", choices=("minmax", "std"), default="minmax")
    parser.add_argument("--smooth", type=int, default=1, help="moving average over N points")
    parser.add_argument(
        "--final-window",
        type=int,
        default=10,
        help="final reward = mean of a run's last N logged steps",
    )
    args = parser.parse_args(argv)
    if not args.experiment and not args.runs:
        parser.error("name runs with --experiment or --runs")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    try:
        check_reachable(args.tracking_uri)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=args.tracking_uri)
    runs = load_runs(client, args.experiment, args.runs)
    if not runs:
        print("error: no runs found", file=sys.stderr)
        return 1
    name = args.name or ("-".join(args.experiment) if args.experiment else "runs")
    out = Path(args.out) if args.out else Path("reports") / re.sub(r"[^\w.-]", "_", name)
    path = write_report(
        runs,
        out,
        f"Comparison: {name}",
        args.tracking_uri,
        args.group_by,
        args.band,
        max(1, args.smooth),
        max(1, args.final_window),
        baseline=args.baseline,
    )
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
