"""Reward functions for GRPO, chosen by name in the `rewards:` config mapping (name -> weight).

Each function has TRL's signature `fn(prompts, completions, answer, **kwargs) -> list[float
| None]` and a `__name__` equal to its registry name (TRL logs `rewards/<name>/mean`).
A completion may be a string (text prompts) or a list of message dicts (chat prompts; the
text is the `content` of its assistant messages). `None` means "does not apply to this
row" (TRL turns it into NaN and ignores it).

- `accuracy`: 1.0 when the content of the LAST `\\boxed{...}` in the completion equals
  the gold `answer` under math-verify (so `336` matches `336^\\circ`, `0.5` matches
  `\\frac{1}{2}`, `142` matches `142.0`), else 0.0; no `\\boxed{}` or nothing parseable
  is 0.0.
- `dapo`: DAPO's rule reward, `accuracy` scored +1.0 (correct) / -1.0 (anything else, no
  `\\boxed{}` included).
- `soft_overlong`: DAPO's soft overlong punishment of the completion's length in tokens
  (`trl.rewards.get_soft_overlong_punishment`), 0 down to -1 over the last `buffer` tokens
  before the maximum; its lengths come from the `reward_options.soft_overlong` config section.
- `format`: 1.0 when the completion holds exactly one `\\boxed{...}`, closed and
  non-empty, followed by at most `FORMAT_MAX_TAIL_CHARS` characters (room for a closing
  `$`, `\\]`, a period or a short sentence), else 0.0.
- `reasoning_gym`: the reasoning-gym scorer of the row's `task` on the extracted answer:
  the last `\\boxed{...}` (a lone `\\text{...}` inside is unwrapped), else the last
  `<answer>...</answer>`, else the last non-empty line. Rows without `task`/`metadata`
  (not from `data.source: reasoning_gym`) get None.

The policy's output is untrusted. `accuracy` and `dapo` (math-verify parses with sympy) and
`reasoning_gym` (some scorers call Python's `eval`, others sympy's `parse_expr`, which
evaluates too) score in the sandboxed worker processes of `mtrl.scoring`, with a time and a
memory limit per completion: a completion that times out or crashes its worker scores as a
wrong answer (0.0; -1.0 for `dapo`) and is counted (`pop_scoring_counts`). In those workers,
reasoning-gym's own `eval` calls only accept Python literals (`ast.literal_eval`), and answers
to scorers that call `parse_expr` must look like a formula (`is_plain_formula`); other answers
score 0.0 there. `format` and the `\\boxed{}` extraction run in the trainer: one pass over the
text, linear in its length.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import logging
import re
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from mtrl import scoring

logger = logging.getLogger(__name__)

FORMAT_MAX_TAIL_CHARS = 100
MATH_VERIFY_TIMEOUT_S = 5

RewardFunc = Callable[..., list[float | None]]
REWARDS: dict[str, RewardFunc] = {}


def _register(name: str) -> Callable[[RewardFunc], RewardFunc]:
    def register(func: RewardFunc) -> RewardFunc:
        func.__name__ = name  # what TRL logs; __qualname__ stays the module attribute (pickle)
        REWARDS[name] = func
        return func

    return register


_counts: Counter[str] = Counter()
_counts_lock = threading.Lock()


def _count(name: str, batch: scoring.Scored) -> None:
    with _counts_lock:
        _counts[f"rewards/{name}/timeouts"] += batch.timeouts
        _counts[f"rewards/{name}/crashes"] += batch.crashes


def pop_scoring_counts() -> dict[str, float]:
    """Timed-out and crashed completions per sandboxed reward since the last call.

    E.g. {"rewards/accuracy/timeouts": 2.0, "rewards/accuracy/crashes": 0.0}: a key for each
    reward that scored since the last call, zeros included.
    """
    with _counts_lock:
        counts = {key: float(value) for key, value in _counts.items()}
        _counts.clear()
    return counts


# ---------------------------------------------------------------------------- extraction

_BOXED = re.compile(r"\\boxed\s*\{")
_BRACE = re.compile(r"[{}]")
_TEXT_WRAP = re.compile(r"^\\text\s*\{(.*)\}$", re.DOTALL)


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the assistant content of a list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        completion = [completion]
    parts = []
    for message in completion or []:
        if not isinstance(message, Mapping) or message.get("role", "assistant") != "assistant":
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):  # content blocks
            parts += [
                b.get("text", "")
                for b in content
                if isinstance(b, Mapping) and b.get("type") == "text"
            ]
    return "\n".join(parts)


def find_boxed(text: str) -> list[tuple[int, int | None]]:
    """Every `\\boxed{...}` in `text`, in order, as (content start, content end or None if unclosed).

    One pass over the braces with a stack, so time is linear in len(text) however many boxes
    and braces it holds; spans rather than strings, so nested boxes cost no copies.
    """
    spans: list[list[Any]] = []
    box_at = {m.end() - 1: m.end() for m in _BOXED.finditer(text)}  # "{" offset -> content start
    stack: list[int | None] = []  # per open brace: its box's index in spans, or None
    for brace in _BRACE.finditer(text):
        pos = brace.start()
        if text[pos] == "{":
            if pos in box_at:
                stack.append(len(spans))
                spans.append([box_at[pos], None])
            else:
                stack.append(None)
        elif stack:  # a "}" with nothing open closes nothing
            box = stack.pop()
            if box is not None:
                spans[box][1] = pos
    return [(start, end) for start, end in spans]


def last_boxed(text: str) -> str | None:
    """The content of the last closed `\\boxed{...}` in `text`, or None."""
    for start, end in reversed(find_boxed(text)):
        if end is not None:
            return text[start:end]
    return None


def _last_answer_tag(text: str) -> str | None:
    """The content of the last `<answer>...</answer>` (case-insensitive); a linear scan."""
    lower, found, pos = text.lower(), None, 0
    while (start := lower.find("<answer>", pos)) >= 0:
        end = lower.find("</answer>", start + 8)
        if end < 0:
            break
        found, pos = text[start + 8 : end], end + 9
    return found


def extract_answer(text: str) -> str | None:
    """A completion's final answer: last `\\boxed{}`, else last `<answer>` tag, else last line."""
    boxed = last_boxed(text)
    if boxed is not None:
        boxed = boxed.strip()
        wrapped = _TEXT_WRAP.match(boxed)
        return wrapped.group(1).strip() if wrapped else boxed
    tag = _last_answer_tag(text)
    if tag is not None:
        return tag.strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


# ---------------------------------------------------------------------------- math-verify
# Everything in this section parses model output: it runs in mtrl.scoring's workers.


def _timeout() -> int | None:
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple[Any, ...]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    text = gold if "\\boxed" in gold or re.search(r"(?<!\\)\$", gold) else f"${gold}$"
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    return tuple(parse(text, extraction_config=config, parsing_timeout=_timeout()))


def math_equal(gold: str, predicted: str) -> bool:
    """Whether a predicted final answer (the content of a `\\boxed{}`) equals the gold answer.

    Runs math-verify (sympy) in the calling process: call it through `mtrl.scoring.score`.
    """
    from math_verify import parse, verify

    gold = gold.strip()
    predicted = predicted.strip()
    if not gold or not predicted:
        return False
    timeout = _timeout()
    try:
        gold_parsed = list(_parse_gold(gold))
        pred_parsed = parse("\\boxed{" + predicted + "}", parsing_timeout=timeout)
        if gold_parsed and pred_parsed:
            return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except Exception:  # math-verify is defensive already; a reward never kills training
        logger.debug("math-verify failed on gold %r, predicted %r", gold, predicted, exc_info=True)
    return gold == predicted  # gold that math-verify cannot read: exact text


def matching_answers(answer: str, candidates: list[str]) -> list[int]:
    """Indices of the candidates that `answer` equals (`math_equal(candidate, answer)`)."""
    return [i for i, candidate in enumerate(candidates) if math_equal(candidate, answer)]


# ---------------------------------------------------------------------------- reasoning-gym
# Also worker-side: reasoning-gym's scorers evaluate answers.

# What a formula handed to sympy's parse_expr may hold: numbers, operators, brackets, and
# names that are one letter or a common function. parse_expr eval()s its input with Python's
# builtins in scope (`eval(chr(95)+...)` runs code), so no quotes, underscores, or other names.
_FORMULA = re.compile(r"[0-9A-Za-z\s+\-*/^().,]*")
_FORMULA_NAMES = frozenset(
    "sin cos tan cot sec csc asin acos atan sinh cosh tanh exp log ln sqrt pi oo Abs".split()
)


def is_plain_formula(answer: str) -> bool:
    """Whether `answer` is safe for sympy's parse_expr: a formula of the characters and names above."""
    if not _FORMULA.fullmatch(answer) or re.search(r"\.\s*[A-Za-z]", answer):  # no attributes
        return False
    return all(len(n) == 1 or n in _FORMULA_NAMES for n in re.findall(r"[A-Za-z]+", answer))


@functools.cache
def _parse_expr_tasks() -> frozenset[str]:
    """The reasoning-gym tasks whose `score_answer` calls sympy's parse_expr or sympify."""
    from reasoning_gym.factory import DATASETS

    return frozenset(
        name
        for name, (dataset_cls, _) in DATASETS.items()
        if {"parse_expr", "sympify"} & set(dataset_cls.score_answer.__code__.co_names)
    )


_MISSING = object()


@contextlib.contextmanager
def _literal_eval_only() -> Iterator[None]:
    """Make every reasoning-gym module's `eval` `ast.literal_eval` while a scorer runs.

    List answers (`['a', 'b']`, what the eval-ing scorers expect) still parse, code does not.
    Restored afterwards: reasoning-gym's generators eval their own expressions (basic_arithmetic),
    and data may be generated in the same process.
    """
    modules = [
        m
        for n, m in list(sys.modules.items())
        if n.split(".")[0] == "reasoning_gym" and m is not None
    ]
    saved = [(m, m.__dict__.get("eval", _MISSING)) for m in modules]
    for module in modules:
        module.eval = ast.literal_eval  # module globals shadow the builtin
    try:
        yield
    finally:
        for module, before in saved:
            if before is _MISSING:
                del module.eval
            else:
                module.eval = before


@functools.cache
def _scorer(task: str) -> Callable[[str | None, dict[str, Any]], float]:
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


def score_reasoning_gym(task: str, predicted: str | None, entry: dict[str, Any]) -> float:
    """The task's scorer on `predicted`, behind the guards above (0.0 where a guard refuses)."""
    source = (entry.get("metadata") or {}).get("source_dataset")  # composite: the real task
    if {task, source} & _parse_expr_tasks() and not is_plain_formula(predicted or ""):
        return 0.0
    scorer = _scorer(task)
    with _literal_eval_only():
        return float(scorer(predicted, entry))


# ---------------------------------------------------------------------------- rewards


def _verified(
    name: str, completions: list[Any], answer: list[Any], right: float, wrong: float
) -> list[float | None]:
    """`right` where the last `\\boxed{}` equals the gold answer (math-verify), else `wrong`.

    No box, an empty one, and a completion whose scoring times out or crashes all score
    `wrong`; rows without a gold answer get None. Timeouts and crashes count under `name`.
    """
    rewards: list[float | None] = [None] * len(completions)
    jobs, rows = [], []
    for i, (completion, gold) in enumerate(zip(completions, answer, strict=True)):
        if gold is None or not str(gold).strip():
            continue
        predicted = last_boxed(completion_text(completion))
        if predicted is None or not predicted.strip():
            rewards[i] = wrong
            continue
        jobs.append((str(gold), predicted))
        rows.append(i)
    batch = scoring.score(math_equal, jobs, default=False)
    _count(name, batch)
    for i, ok in zip(rows, batch.values, strict=True):
        rewards[i] = right if ok else wrong
    return rewards


@_register("accuracy")
def accuracy_reward(
    prompts: list[Any], completions: list[Any], answer: list[Any], **kwargs: Any
) -> list[float | None]:
    """1.0 when the last `\\boxed{}` of the completion equals the gold answer (math-verify)."""
    return _verified("accuracy", completions, answer, right=1.0, wrong=0.0)


@_register("dapo")
def dapo_reward(
    prompts: list[Any], completions: list[Any], answer: list[Any], **kwargs: Any
) -> list[float | None]:
    """DAPO's rule reward: `accuracy` mapped to +1.0 (correct) / -1.0 (wrong or no box)."""
    return _verified("dapo", completions, answer, right=1.0, wrong=-1.0)


@_register("format")
def format_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
    """1.0 for exactly one closed, non-empty `\\boxed{}` near the end of the completion."""
    rewards: list[float | None] = []
    for completion in completions:
        text = completion_text(completion)
        boxed = find_boxed(text)
        ok = False
        if len(boxed) == 1 and boxed[0][1] is not None:
            start, end = boxed[0]
            ok = bool(text[start:end].strip()) and (
                len(text[end + 1 :].strip()) <= FORMAT_MAX_TAIL_CHARS
            )
        rewards.append(1.0 if ok else 0.0)
    return rewards


@_register("reasoning_gym")
def reasoning_gym_reward(
    prompts: list[Any],
    completions: list[Any],
    answer: list[Any],
    task: list[str | None] | None = None,
    metadata: list[str | None] | None = None,
    problem: list[str | None] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """The reasoning-gym scorer of each row's task on the completion's extracted answer."""
    n = len(completions)
    tasks = task if task is not None else [None] * n
    metas = metadata if metadata is not None else [None] * n
    problems = problem if problem is not None else [None] * n
    rewards: list[float | None] = [None] * n
    jobs, rows = [], []
    for i, (completion, gold, row_task, meta, question) in enumerate(
        zip(completions, answer, tasks, metas, problems, strict=True)
    ):
        if not row_task or meta is None:
            continue
        entry = {
            "question": question,
            "answer": gold,
            "metadata": json.loads(meta) if isinstance(meta, str) else meta,
        }
        jobs.append((row_task, extract_answer(completion_text(completion)), entry))
        rows.append(i)
    if jobs:
        batch = scoring.score(score_reasoning_gym, jobs, default=0.0)
        _count("reasoning_gym", batch)
        for i, value in zip(rows, batch.values, strict=True):
            rewards[i] = value
    return rewards


@_register("soft_overlong")
def soft_overlong_reward(
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]],
    *,
    max_completion_length: int,
    buffer: int,
    **kwargs: Any,
) -> list[float | None]:
    """DAPO's soft overlong punishment of each completion's length L in tokens (TRL's own).

    0 for L <= max_completion_length - buffer, then (max_completion_length - buffer - L) / buffer,
    reaching -1 at L = max_completion_length, and -1 beyond. `build_reward_funcs` binds the two
    lengths from `reward_options.soft_overlong` (see `soft_overlong_lengths`).
    """
    from trl.rewards import get_soft_overlong_punishment

    return get_soft_overlong_punishment(max_completion_length, buffer)(completion_ids)


def soft_overlong_lengths(
    options: Mapping[str, Any] | None, max_completion_length: int | None
) -> dict[str, int]:
    """`soft_overlong`'s keyword arguments from the `reward_options` section, checked.

    `options["soft_overlong"]` holds `max_completion_length` (tokens; None stands for the
    `max_completion_length` argument, GRPOConfig's) and `buffer` (tokens, 0 < buffer < max).
    Raises ValueError with one line naming the key.
    """
    key = "reward_options.soft_overlong"
    section = (options or {}).get("soft_overlong") or {}
    length, source = section.get("max_completion_length"), f"{key}.max_completion_length"
    if length is None:
        length, source = max_completion_length, "train.max_completion_length"
    if length is None:
        raise ValueError(f"{key}.max_completion_length: null means {source}, which is null too")
    buffer = section.get("buffer")
    for name, value in [(source, length), (f"{key}.buffer", buffer)]:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: must be a whole number of tokens > 0, got {value!r}")
    if buffer >= length:
        raise ValueError(f"{key}.buffer: must be < {source} ({length}), got {buffer}")
    return {"max_completion_length": length, "buffer": buffer}


def build_reward_funcs(
    weights: Mapping[str, float],
    options: Mapping[str, Any] | None = None,
    max_completion_length: int | None = None,
) -> tuple[list[RewardFunc], list[float]]:
    """Reward functions and their weights, in the mapping's order, for GRPOTrainer/GRPOConfig.

    `GRPOTrainer(reward_funcs=funcs, args=GRPOConfig(reward_weights=weights, ...))`.
    `options` is the config's `reward_options` section and `max_completion_length` GRPOConfig's;
    only the rewards that take options (`soft_overlong`) read them. Raises ValueError (one line).
    """
    funcs, values = [], []
    for name, weight in weights.items():
        if name not in REWARDS:
            raise ValueError(f"rewards.{name}: unknown reward; known: {', '.join(REWARDS)}")
        func = REWARDS[name]
        if name == "soft_overlong":  # the one reward with options: its two lengths are bound
            lengths = soft_overlong_lengths(options, max_completion_length)
            func = functools.partial(func, **lengths)  # TRL logs a partial by the wrapped name
        funcs.append(func)
        values.append(float(weight))
    if not funcs:
        raise ValueError("rewards: name at least one reward")
    return funcs, values
