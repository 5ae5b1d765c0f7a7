"""The learning comparison: one temperature vs multi-temperature vs rollout offsets, by seed.

    python bench/learning.py --call c1 --arms single_t1 multi_p02 --parallel 4 --seeds 0 1 2 3
    python bench/learning.py --call c2 --arms single_matched offsets --parallel 4   # GPU calls
    python bench/learning.py --report --out bench/results/learning.md             # CPU

Protocol, fixed before any run:

- Experiment `experiments/learning.yaml`: SmolLM2-135M-Instruct, GRPO on 2-term 2-digit
  +/- problems (reasoning-gym seed 0, 1,000 problems), held-out avg@4 on 500 problems of
  seed 1,000,000 from which `mtrl.eval` drops every question that is in the training pool
  (27 of 600; `eval/<bench>/dropped_overlap` logs it), 4 samples at T = 0.6, top-p 0.95.
- Shared start: every arm starts from the same weights, the converted base model, and the
  same prompt, with one worked example ending in `\\boxed{}` as a chat turn before it
  (`data.few_shot`). The base model on the full held-out set (500 x 4, CPU, 2026-12-05):
  avg@4 0.149, pass@4 0.230, boxed rate 0.88 (without the example it boxed 0 of 16), so it
  already answers in the format, with room to move either way. Not a warm-up
  checkpoint: a device machine is handed back 30 s after a call and what travels between
  calls is at most 64 MiB, so a 270 MB checkpoint cannot be "saved once" and shared by
  runs of different calls; re-training it in each call would give each call its own start.
- Arms (`ARMS`): single T = 1.0 (the baseline); single T = the multi p=0.2 arm's measured
  mean token temperature (`single_matched`); multi p = 0.2, T = 1.2 / 0.8; the authors'
  later multi p = 0.4, T = 1.2 / 1.0; single T = 1.0 with rollout offsets (0, 0, -0.1,
  +0.1, ..., +-0.3 across the 8 completions of a prompt, mean 1.0).
- The matched temperature is measured, not assumed: per logged step of each finished
  multi_p02 run, share x T_reasoning + (1 - share) x T_knowledge from its
  `sampler/reasoning_share` and `sampler/*/temperature_mean` metrics, averaged over steps,
  then over runs (nominal: 0.2 x 1.2 + 0.8 x 0.8 = 0.88). So multi_p02 runs before it.
- Seeds 0-4 in every arm, the same fixed number of steps (`--steps`, 30) in every run.
- Statistics: primary = per seed, an arm's final held-out avg@4 minus single_t1's of the
  same seed; mean over seeds with a 95% percentile bootstrap interval over seeds (10,000
  resamples, RNG seed 0). Secondary, the same way: pass@4, boxed rate, mean completion
  tokens, mean token entropy of rollouts. A run that did not finish (exit status, deadline,
  MLflow status, no final evaluation) is listed with its reason and left out; never a 0.
  A later attempt of the same arm and seed replaces an earlier one (both are listed).
- Checks added after the runs (they can only withdraw a claim, never make one): the primary
  again with Student-t intervals (a percentile bootstrap of 5 seeds is too narrow), with
  Bonferroni intervals for the several arms against one baseline, and with the earliest
  attempts; the report's bottom line names an arm as different only if every reading does.

Sizes (one H100/H200 per call, calls of at most 10 minutes), as an H100 measured them on
2026-12-05 (commit d77fc7e, the settings in learning.yaml: fp32, micro-batches of 32, no
decode compilation, evaluation batches of 128): a process peaks at 6.5-16.5 GB, so 8 at once
(evaluation batches of 256) and 5 at once ran out of the card's 80 GB, and 4 at once peaked at
65 GB; with 4 sharing the card a run takes 3.1-3.5 min (30 steps, two evaluations of 500 x 4,
model load). Plan: `--parallel 4`, 8 runs a call; single_matched needs finished multi_p02
runs in an earlier call of the same machine or `--matched-temperature`. Runs start
seed-major, so a cut batch loses the same seeds in every arm; once runs have ended, a run is
started only if the slowest of them would still end before `--deadline` (default 480 s),
and what is still running then is killed. Runs that did not finish count as failed and are
run again in a later call (every run keeps the same `--steps`): `--missing` runs only those of
`--arms` x `--seeds` that no earlier call under `--work` finished.

The runs behind bench/results/learning.md (stores, manifests, logs; no weights) are in
bench/results/learning/runs.tar.xz; to rebuild the report:
`mkdir -p runs/learning && tar -xJf bench/results/learning/runs.tar.xz -C
runs/learning && python bench/learning.py --report --work runs/learning`.

Each call writes `<work>/<call>/`: an MLflow file store (`mlruns`, what mlflow-skinny
writes), one log per run and `manifest.json` (card, date, commit, command, each run's
arm, seed, exit status, seconds). `--report` reads every `<work>/*/manifest.json` and its
store and writes the report, its figures beside it (`<out stem>/`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.report import git_commit  # noqa: E402

EXPERIMENT_FILE = "experiments/learning.yaml"
EXPERIMENT = "learning"  # tracking.experiment of that file
BASELINE = "single_t1"
CALIBRATION = "multi_p02"  # the arm whose measured mean temperature single_matched uses
MATCHED = "single_matched"
ARMS: dict[str, tuple[str, list[str]]] = {  # name: (description, overrides)
    BASELINE: ("single T=1.0", ["sampler.mode=single", "sampler.temperature=1.0"]),
    MATCHED: ("single T = multi p=0.2's measured mean token temperature", []),
    CALIBRATION: (
        "multi p=0.2 T=1.2/0.8",
        [
            "sampler.mode=multi",
            "sampler.reasoning_fraction=0.2",
            "sampler.high_temperature=1.2",
            "sampler.low_temperature=0.8",
        ],
    ),
    "multi_p04": (
        "multi p=0.4 T=1.2/1.0 (the authors' later setting)",
        [
            "sampler.mode=multi",
            "sampler.reasoning_fraction=0.4",
            "sampler.high_temperature=1.2",
            "sampler.low_temperature=1.0",
        ],
    ),
    "offsets": (
        "single T=1.0, rollout offsets 0,0,-0.1,+0.1,...,+-0.3",
        [
            "sampler.mode=single",
            "sampler.temperature=1.0",
            "sampler.rollout_offsets=true",
            "sampler.rollout_offset_step=0.1",
        ],
    ),
}
SEEDS = [0, 1, 2, 3, 4]
STEPS = 30


def load_compare() -> Any:
    """launch/compare.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("compare", ROOT / "launch" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def manifests(work: Path) -> list[dict[str, Any]]:
    """Every call's manifest under `work`, oldest first. A call's file store is read from
    beside its manifest: the absolute path it had on the GPU machine is not this one's."""
    found = []
    for path in sorted(work.glob("*/manifest.json")):
        manifest = json.loads(path.read_text())
        if manifest["tracking_uri"].startswith("file:"):
            manifest["tracking_uri"] = (path.parent / "mlruns").as_uri()
        found.append(manifest)
    return sorted(found, key=lambda m: m["started"])


def load_all_runs(work: Path) -> tuple[list[Any], list[dict[str, Any]]]:
    """(compare.Run of every call's store, each with `.call` set; the manifests)."""
    compare = load_compare()
    import mlflow

    calls = manifests(work)
    runs = []
    for uri in dict.fromkeys(m["tracking_uri"] for m in calls):
        client = mlflow.MlflowClient(tracking_uri=uri)
        if client.get_experiment_by_name(EXPERIMENT) is None:
            continue
        for run in compare.load_runs(client, [EXPERIMENT], []):
            run.call = next(
                (m["call"] for m in calls if m["tracking_uri"] == uri), "?"
            )  # a store belongs to one call
            runs.append(run)
    return runs, calls


def last_error(log: Path) -> str | None:
    """The first sentence of the last exception line of a run's log (`torch.OutOfMemoryError:
    CUDA out of memory`), at most 100 characters; None without a log or one."""
    if not log.is_file():
        return None
    lines = log.read_text(errors="replace").splitlines()[-200:]
    errors = [x for x in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b:?", x)]
    return errors[-1].split(". ")[0][:100] if errors else None


def manifest_failures(runs: list[Any], calls: list[dict[str, Any]], work: Path) -> dict[str, str]:
    """run id -> the failure its call recorded (exit status, deadline), for runs with one;
    an exit status comes with the last exception line of the run's log."""
    records = {(m["call"], r["name"]): r for m in calls for r in m["runs"]}
    failures = {}
    for run in runs:
        record = records.get((run.call, run.name))
        if record and record["failure"]:
            error = record["returncode"] and last_error(work / run.call / f"{run.name}.log")
            failures[run.run_id] = record["failure"] + (f": {error}" if error else "")
    return failures


def run_temperature(run: Any) -> float | None:
    """A run's mean token temperature: per step share x T_reasoning + (1 - share) x T_knowledge
    (a step without reasoning tokens logs no reasoning temperature: its share is 0), averaged
    over the logged steps."""
    share = dict(run.histories.get("sampler/reasoning_share", []))
    high = dict(run.histories.get("sampler/reasoning/temperature_mean", []))
    low = dict(run.histories.get("sampler/knowledge/temperature_mean", []))
    per_step = []
    for step, s in share.items():
        if step in low and (step in high or s == 0):
            per_step.append(s * high.get(step, 0.0) + (1 - s) * low[step])
    return statistics.fmean(per_step) if per_step else None


def finished_runs(work: Path) -> list[Any]:
    """Every run under `work` that counts: its call recorded no failure and MLflow shows it
    finished with its final evaluation (compare.failure)."""
    compare = load_compare()
    runs, calls = load_all_runs(work) if work.is_dir() else ([], [])
    failures = manifest_failures(runs, calls, work)
    now = int(time.time() * 1000)
    return [r for r in runs if r.run_id not in failures and compare.failure(r, now) is None]


def measured_temperature(work: Path) -> tuple[float, list[str]]:
    """The matched temperature (3 decimals) from the finished calibration runs under `work`,
    and their names. Raises SystemExit with one line when there are none."""
    compare = load_compare()
    values = {}
    for run in finished_runs(work):
        if compare.group_label(run, "arm") == CALIBRATION:
            value = run_temperature(run)
            if value is not None:
                values[run.name] = value
    if not values:
        raise SystemExit(
            f"error: --arms {MATCHED}: no finished {CALIBRATION} run under {work} to measure "
            f"its mean temperature from (run {CALIBRATION} in an earlier call, or pass "
            "--matched-temperature)"
        )
    return round(statistics.fmean(values.values()), 3), sorted(values)


def run_commands(
    arms: list[str],
    seeds: list[int],
    steps: int,
    folder: Path,
    uri: str,
    matched_temperature: float | None,
    extra: list[str],
) -> dict[str, tuple[str, int, list[str]]]:
    """name -> (arm, seed, command) of every run of a batch; names are `<arm>-s<seed>`.

    Seed-major order (every arm of seed 0, then of seed 1, ...): the batch starts runs in this
    order, so a deadline that cuts it costs whole seeds, the same ones in every arm."""
    commands = {}
    for seed in seeds:
        for arm in arms:
            overrides = list(ARMS[arm][1])
            if arm == MATCHED:
                overrides = ["sampler.mode=single", f"sampler.temperature={matched_temperature}"]
            name = f"{arm}-s{seed}"
            commands[name] = (
                arm,
                seed,
                [
                    sys.executable,
                    str(ROOT / "launch" / "train.py"),
                    str(ROOT / EXPERIMENT_FILE),
                    *overrides,
                    f"train.seed={seed}",
                    f"train.max_steps={steps}",
                    f"eval.every_n_steps={steps}",  # step 0 and the final step
                    f"train.output_dir={folder / name}",
                    f"tracking.uri={uri}",
                    f"tracking.run_name={name}",
                    f"tracking.experiment={EXPERIMENT}",
                    *extra,
                ],
            )
    return commands


def run_batch(args: argparse.Namespace) -> int:
    """Run the batch's runs as parallel processes (at most --parallel at once) into
    <work>/<call>/, writing the manifest as each ends; stop all at --deadline."""
    work = Path(args.work).resolve()
    folder = work / args.call
    if (folder / "manifest.json").exists():
        raise SystemExit(f"error: --call {args.call}: {folder} already holds a call; name another")
    matched = args.matched_temperature
    calibration: list[str] = []
    if MATCHED in args.arms and matched is None:
        matched, calibration = measured_temperature(work)
    folder.mkdir(parents=True, exist_ok=True)
    uri = args.tracking_uri or (folder / "mlruns").as_uri()
    commands = run_commands(args.arms, args.seeds, args.steps, folder, uri, matched, args.overrides)
    if args.missing:  # a retry: leave out what an earlier call of `work` already finished
        done = {r.name for r in finished_runs(work)}
        commands = {name: c for name, c in commands.items() if name not in done}
        print(f"{args.call}: --missing: {len(done)} runs finished earlier, {len(commands)} to run")
    import mlflow
    import torch

    # Create the experiment before the runs start: concurrent first use races on it.
    client = mlflow.MlflowClient(uri)
    if client.get_experiment_by_name(EXPERIMENT) is None:
        client.create_experiment(EXPERIMENT)
    manifest: dict[str, Any] = {
        "call": args.call,
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "commit": git_commit(args.commit, watch=("bench", "mtrl", "experiments", "launch")),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "tracking_uri": uri,
        "steps": args.steps,
        "matched_temperature": matched,
        "matched_from": calibration or ("--matched-temperature" if matched else None),
        "runs": [],
    }

    def save() -> None:
        tmp = folder / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(folder / "manifest.json")

    save()
    start = time.time()
    queue = list(commands)
    running: dict[str, tuple[subprocess.Popen, Any, float]] = {}
    slowest = 0.0  # seconds of the slowest run that ended so far

    def not_started(names: list[str], failure: str) -> None:
        for name in names:
            arm, seed, _ = commands[name]
            manifest["runs"].append(
                {
                    "name": name,
                    "arm": arm,
                    "seed": seed,
                    "seconds": 0.0,
                    "returncode": None,
                    "failure": failure,
                }  # fmt: skip
            )

    while queue or running:
        # A run that would end after the deadline only slows the runs that share the card
        # with it, and is killed anyway: once runs have ended, start one only if the slowest
        # of them would still have fitted.
        if queue and slowest and time.time() - start + slowest > args.deadline:
            not_started(queue, f"not started: the slowest run ({slowest:.0f} s) would not end "
                        f"before the deadline ({args.deadline:.0f} s)")  # fmt: skip
            queue = []
        while queue and len(running) < args.parallel:
            name = queue.pop(0)
            log = open(folder / f"{name}.log", "w")  # noqa: SIM115 (closed when it ends)
            proc = subprocess.Popen(
                commands[name][2], cwd=folder, stdout=log, stderr=subprocess.STDOUT
            )
            running[name] = (proc, log, time.time())
        time.sleep(2)
        late = time.time() - start > args.deadline
        for name, (proc, log, began) in list(running.items()):
            if proc.poll() is None and not late:
                continue
            reason = None
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                reason = f"killed at the batch deadline ({args.deadline:.0f} s)"
            elif proc.returncode != 0:
                reason = f"exit status {proc.returncode} (see {name}.log)"
            log.close()
            arm, seed, _ = commands[name]
            seconds = time.time() - began
            manifest["runs"].append(
                {
                    "name": name,
                    "arm": arm,
                    "seed": seed,
                    "seconds": round(seconds, 1),
                    "returncode": proc.returncode,
                    "failure": reason,
                }  # fmt: skip
            )
            print(f"{name}: {reason or 'finished'} after {seconds / 60:.1f} min", flush=True)
            del running[name]
            slowest = max(slowest, seconds)
            save()
        if late:
            not_started(queue, "not started before the deadline")
            queue = []
    manifest["minutes"] = round((time.time() - start) / 60, 2)
    save()
    failed = [r for r in manifest["runs"] if r["failure"]]
    print(f"{args.call}: {len(commands)} runs in {manifest['minutes']} min, {len(failed)} failed")
    return 1 if failed else 0


# ---------------------------------------------------------------------------- report


def bottom_line(readings: dict[str, list[str]], arms: list[str]) -> str:
    """One sentence over every reading of the primary (each a list of verdicts that start
    with their arm's name): an arm differs from the baseline only if all readings say so."""
    found, leads = [], []
    for arm in arms:
        verdicts = [v for reading in readings.values() for v in reading if v.startswith(f"{arm} ")]
        for way in ("higher", "lower"):
            said = [f"{arm} scored {way} than" in v for v in verdicts]
            if len(said) == len(readings) and all(said):
                found.append(f"{arm} scored {way} than {BASELINE}")
            elif any(said):
                leads.append(f"{arm} {way}")
    names = ", ".join(readings)
    text = (
        "Bottom line: " + "; ".join(found) + f" under every reading ({names})."
        if found
        else f"Bottom line: no arm differs from {BASELINE} under every reading ({names})."
    )
    if leads:
        text += (
            " Under some readings only: " + ", ".join(leads) + "; a lead to test with more "
            "seeds, not a finding."
        )
    return text


def code_changes(calls: list[dict[str, Any]], counted: list[Any]) -> str | None:
    """When the counted runs come from calls of different commits: which arms ran at which
    commit, and the files of the trained code (mtrl, experiments, launch) that differ between
    the commits (git diff --name-only), so that a reader sees what the arms did not share."""
    compare = load_compare()
    commit_of = {m["call"]: m["commit"] for m in calls}
    arms: dict[str, set[str]] = {}
    for run in counted:
        arms.setdefault(commit_of[run.call], set()).add(compare.group_label(run, "arm"))
    if len(arms) < 2:
        return None
    first, *others = sorted(arms, key=lambda c: min(m["started"] for m in calls
                                                    if m["commit"] == c))  # fmt: skip
    text = "Counted runs come from more than one commit: " + "; ".join(
        f"{c} ({', '.join(sorted(arms[c]))})" for c in [first, *others]
    )
    for other in others:
        diff = subprocess.run(
            ["git", "diff", "--name-only", first, other, "--", "mtrl", "experiments", "launch"],
            capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        changed = diff.stdout.split() if diff.returncode == 0 else None
        text += f". {first}..{other} changes in mtrl/, experiments/, launch/: " + (
            "none" if changed == [] else ", ".join(changed) if changed else "unknown (git)"
        )
    return text + "."


def shown_uri(uri: str) -> str:
    """A file store as a path relative to the working directory (the report is committed)."""
    if uri.startswith("file:"):
        path = Path(uri.removeprefix("file://"))
        return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)
    return uri


def write_learning_report(work: Path, out: Path, now_ms: int | None = None) -> Path:
    """The report `out` (markdown) from every call under `work`; figures in `<out stem>/`."""
    compare = load_compare()
    runs, calls = load_all_runs(work)
    if not calls:
        raise SystemExit(f"error: --work: no call manifests under {work}")
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    records = {(m["call"], r["name"]): r for m in calls for r in m["runs"]}
    order = {m["call"]: i for i, m in enumerate(calls)}
    failures = manifest_failures(runs, calls, work)
    # A later attempt of the same arm and seed replaces an earlier one.
    latest: dict[str, Any] = {}
    for run in sorted(runs, key=lambda r: (order.get(r.call, -1), r.name)):
        latest[run.name] = run
    replaced = [r for r in runs if latest[r.name] is not r]
    kept = [r for r in runs if latest[r.name] is r]
    in_store = {(r.call, r.name) for r in runs}
    missing = [(c, r) for (c, name), r in records.items() if (c, name) not in in_store]

    figures = out.parent / out.stem
    sub = compare.write_report(
        kept,
        figures,
        "Comparison",
        "`, `".join(dict.fromkeys(shown_uri(m["tracking_uri"]) for m in calls)),
        "arm",
        "minmax",
        1,
        5,
        baseline=BASELINE,
        now_ms=now_ms,
        failures=failures,
    )
    body = sub.read_text().split("\n", 1)[1]  # without its title
    body = body.replace("](", f"]({figures.name}/").replace("## ", "### ")

    def counts(run: Any) -> bool:
        return (failures.get(run.run_id) or compare.failure(run, now_ms)) is None

    def by_arm_of(selected: list[Any]) -> dict[str, list[Any]]:
        groups: dict[str, list[Any]] = {}
        for run in selected:
            groups.setdefault(compare.group_label(run, "arm"), []).append(run)
        return groups

    def against_baseline(
        groups: dict[str, list[Any]], key: str, level: float = 0.95, interval: Any = None
    ) -> list[str]:
        """The primary verdict of every arm against the baseline, paired by seed, with the
        protocol's bootstrap interval or `interval` (compare.paired_t_interval)."""
        verdicts = []
        for arm in ARMS:
            if arm == BASELINE or arm not in groups:
                continue
            diffs = [d for _, d in compare.paired_differences(groups[arm], groups[BASELINE],
                                                              key)]  # fmt: skip
            if not diffs:
                continue
            stat = (interval or compare.paired_bootstrap)(diffs, level=level)
            text = compare.verdict(arm, BASELINE, compare.display(key.removeprefix("eval/")),
                                   stat, len(diffs), level)  # fmt: skip
            if len(diffs) < len(SEEDS):
                text += f" Fewer paired seeds than the planned {len(SEEDS)}."
            verdicts.append(text)
        return verdicts

    ok = [r for r in kept if counts(r)]
    by_arm = by_arm_of(ok)
    eval_keys = compare.heldout_keys(ok)
    primary = next((k for k in eval_keys if "/avg_at_" in k), None)
    conclusion = []
    if primary is None or BASELINE not in by_arm:
        conclusion.append(f"No conclusion: no finished {BASELINE} run with a held-out evaluation.")
    else:
        metric = compare.display(primary.removeprefix("eval/"))
        readings = {"the protocol's bootstrap": against_baseline(by_arm, primary)}
        conclusion += readings["the protocol's bootstrap"]
        # Checks a skeptical reader asks for, each a full set of verdicts; the bottom line
        # claims only what all of them support.
        if all(len(g) > 1 for g in by_arm.values()):
            readings["Student-t"] = against_baseline(
                by_arm, primary, interval=compare.paired_t_interval
            )
            conclusion.append(
                "With Student-t intervals instead of the bootstrap's (a percentile bootstrap "
                "of a few seeds is too narrow): " + " ".join(readings["Student-t"])
            )
        compared = [a for a in ARMS if a != BASELINE and a in by_arm]
        if len(compared) > 1:  # several arms against one baseline: family-wise 5%
            level = 1 - 0.05 / len(compared)
            readings["Bonferroni"] = against_baseline(by_arm, primary, level)
            conclusion.append(
                f"Adjusted for the {len(compared)} comparisons with {BASELINE} (Bonferroni, "
                f"family-wise 5%): " + " ".join(readings["Bonferroni"])
            )
        # The rule "the latest attempt counts" is fixed, but a reader may ask whether it
        # picked results: the same verdicts with the earliest finished attempt instead.
        earliest: dict[str, Any] = {}
        for run in sorted(runs, key=lambda r: (order.get(r.call, -1), r.name)):
            if counts(run):
                earliest.setdefault(run.name, run)
        differ = sorted(n for n, r in earliest.items() if latest[n] is not r)
        if differ:
            readings["earliest attempts"] = against_baseline(
                by_arm_of(list(earliest.values())), primary
            )
            conclusion.append(
                f"The same with the earliest finished attempt of each run instead of the "
                f"latest ({len(differ)} differ: {', '.join(differ)}): "
                + " ".join(readings["earliest attempts"])
            )
        conclusion.insert(0, bottom_line(readings, compared))
        # Room to learn: each arm's final value against its own step-0 evaluation (the shared
        # start), paired by run; the baseline first.
        for arm in sorted(by_arm, key=lambda a: a != BASELINE):
            gains = [h[-1][1] - h[0][1] for r in by_arm[arm]
                     if len(h := r.histories.get(primary, [])) > 1 and h[0][0] == 0]  # fmt: skip
            if gains:
                stat = compare.paired_bootstrap(gains)
                conclusion.append(compare.verdict(arm, "the shared start (its step 0)", metric,
                                                  stat, len(gains)))  # fmt: skip
        commits = code_changes(calls, ok)
        if commits:
            conclusion.append(commits)
        absent = [a for a in ARMS if a not in by_arm]
        if absent:
            conclusion.append("No finished runs for: " + ", ".join(absent) + ".")
    conclusion.append(
        "Secondary metrics (pass@4, boxed rate, length, entropy) are not corrected for "
        "comparing several metrics and arms: an interval there that excludes 0 is a lead to "
        "test, not a finding."
    )

    def dropped() -> str:
        values = sorted(
            {
                (k.split("/")[1], v)
                for r in ok
                for k, h in r.histories.items()
                if k.endswith("/dropped_overlap")
                for _, v in h
            }  # fmt: skip
        )
        problems = sorted(
            {
                v
                for r in ok
                for k, h in r.histories.items()
                if k.endswith("/num_problems")
                for _, v in h
            }  # fmt: skip
        )
        if not values:
            return "not logged"
        kept_n = ", ".join(f"{v:.0f}" for v in problems)
        return ", ".join(f"{b}: {v:.0f}" for b, v in values) + f" dropped; {kept_n} evaluated"

    matched = [m for m in calls if m.get("matched_temperature") is not None]
    if not matched:  # say what the next call will run it at
        try:
            value, names = measured_temperature(work)
            planned = [f"  - `{MATCHED}` not run yet: T = {value} measured from {names}"]
        except SystemExit:
            planned = []
    lines = [
        "# Learning: one temperature vs multi-temperature vs rollout offsets",
        "",
        "## Conclusion",
        "",
        *[f"- {c}" for c in conclusion],
        "",
        "## Protocol (fixed before the runs)",
        "",
        f"- experiment `{EXPERIMENT_FILE}`: SmolLM2-135M-Instruct, GRPO, 2-term 2-digit +/-; "
        f"every run starts from the same base weights and prompt; held-out problems that are "
        f"in the training pool are dropped ({dropped()}).",
        f"- arms (runs named `<arm>-s<seed>`), seeds {', '.join(map(str, SEEDS))} in each, "
        f"{', '.join(sorted({str(m['steps']) for m in calls}))} steps in every run:",
        *[f"  - `{a}`: {d}" + (f" (`{' '.join(o)}`)" if o else "") for a, (d, o) in ARMS.items()],
        *[
            f"  - `{MATCHED}` in {m['call']}: T = {m['matched_temperature']} from "
            f"{m['matched_from']}"
            for m in matched
        ],
        *([] if matched else planned),
        f"- primary: per seed, final held-out avg@4 minus `{BASELINE}`'s of the same seed; mean "
        "with a 95% percentile bootstrap interval over seeds (10,000 resamples, RNG seed 0). "
        "Secondary the same way: pass@4, boxed rate, mean completion tokens, mean token "
        "entropy. Runs that did not finish are listed with their reason, never counted as 0.",
        "",
        "## Calls",
        "",
        "| call | card | started | commit | runs | minutes | failed | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in calls:
        names = ", ".join(r["name"] for r in m["runs"])
        bad = [r["name"] for r in m["runs"] if r["failure"]]
        lines.append(
            f"| {m['call']} | {m['card']} | {m['started']} | {m['commit']} | {names} | "
            f"{m.get('minutes', '?')} | {', '.join(bad) or '-'} | `{m['command']}` |"
        )
    shown = [shown_uri(p.resolve().as_uri()) for p in (work, out)]
    lines += ["", f"Report: `python bench/learning.py --report --work {shown[0]} --out {shown[1]}`"]
    if replaced or missing:
        lines += ["", "Attempts not counted:", ""]
        for r in replaced:
            outcome = failures.get(r.run_id) or compare.failure(r, now_ms) or "finished"
            lines.append(f"- {r.name} of {r.call} ({outcome}): replaced by {latest[r.name].call}'s")
        for c, r in missing:
            error = r["returncode"] and last_error(work / c / f"{r['name']}.log")
            lines.append(f"- {r['name']} of {c}: {r['failure'] or 'no MLflow run'}"
                         + (f": {error}" if error else ""))  # fmt: skip
    lines += ["", "## Results", "", body]
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/learning", help="calls' folders (stores, logs)")
    parser.add_argument("--call", help="this batch's name: its folder under --work")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=[])
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--steps", type=int, default=STEPS, help="the same in every run")
    parser.add_argument("--parallel", type=int, default=4, help="runs at once on the card")
    parser.add_argument("--deadline", type=float, default=480, help="seconds for the batch")
    parser.add_argument("--matched-temperature", type=float, help=f"T of {MATCHED}")
    parser.add_argument(
        "--missing",
        action="store_true",
        help="run only the runs of --arms x --seeds without a finished attempt under --work",
    )
    parser.add_argument("--commit", help="the commit measured (default: git's HEAD)")
    parser.add_argument("--tracking-uri", help="default: a file store in <work>/<call>/mlruns")
    parser.add_argument("--report", action="store_true", help="only write the report")
    parser.add_argument("--out", default="bench/results/learning.md")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    # One file store per call: concurrent runs write separate folders (no database lock), and
    # mlflow-skinny, which the GPU machines install, has no sqlite backend. MLflow 3 asks for
    # this opt-in; the runs inherit it.
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    if args.report:
        path = write_learning_report(Path(args.work).resolve(), Path(args.out).resolve())
        print(path.read_text())
        return 0
    if not args.call or not args.arms:
        parser.error("a batch needs --call and --arms (or pass --report)")
    if args.steps <= 0 or args.parallel <= 0 or len(set(args.seeds)) != len(args.seeds):
        parser.error("--steps and --parallel must be > 0, --seeds without repeats")
    if args.matched_temperature is not None and not math.isfinite(args.matched_temperature):
        parser.error("--matched-temperature must be finite")
    return run_batch(args)


if __name__ == "__main__":
    sys.exit(main())
