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
- `format`: 1.0 when the completion holds exactly one `\\boxed{...}`, closed and
  non-empty, followed by at most `FORMAT_MAX_TAIL_CHARS` characters (room for a closing
  `$`, `\\]`, a period or a short sentence), else 0.0.
- `reasoning_gym`: the reasoning-gym scorer of the row's `task` on the extracted answer:
  the last `\\boxed{...}` (a lone `\\text{...}` inside is unwrapped), else the last
  `<answer>...</answer>`, else the last non-empty line. Rows without `task`/`metadata`
  (not from `data.source: reasoning_gym`) get None.

math-verify bounds parsing and comparison with SIGALRM, which only works in the main
thread; elsewhere (e.g. a reward run from a worker thread) it runs without a time limit.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

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


# ---------------------------------------------------------------------------- extraction

_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
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


def find_boxed(text: str) -> list[tuple[str | None, int]]:
    """Every `\\boxed{...}` in `text` as (content, end offset); content None when unclosed."""
    found = []
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    found.append((text[start:i], i + 1))
                    break
        else:
            found.append((None, len(text)))
    return found


def last_boxed(text: str) -> str | None:
    """The content of the last closed `\\boxed{...}` in `text`, or None."""
    closed = [content for content, _ in find_boxed(text) if content is not None]
    return closed[-1] if closed else None


def extract_answer(text: str) -> str | None:
    """A completion's final answer: last `\\boxed{}`, else last `<answer>` tag, else last line."""
    boxed = last_boxed(text)
    if boxed is not None:
        boxed = boxed.strip()
        wrapped = _TEXT_WRAP.match(boxed)
        return wrapped.group(1).strip() if wrapped else boxed
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


# ---------------------------------------------------------------------------- math-verify


def _timeout() -> int | None:
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple[Any, ...]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    text = gold if "\\boxed" in gold or re.search(r"(?<!\\)\$", gold) else f"${gold}$"
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    return tuple(parse(text, extraction_config=config, parsing_timeout=_timeout()))


def math_equal(gold: str, predicted: str) -> bool:
    """Whether a predicted final answer (the content of a `\\boxed{}`) equals the gold answer."""
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


# ---------------------------------------------------------------------------- rewards


@_register("accuracy")
def accuracy_reward(
    prompts: list[Any], completions: list[Any], answer: list[Any], **kwargs: Any
) -> list[float | None]:
    """1.0 when the last `\\boxed{}` of the completion equals the gold answer (math-verify)."""
    rewards: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        if gold is None or not str(gold).strip():
            rewards.append(None)
            continue
        predicted = last_boxed(completion_text(completion))
        rewards.append(1.0 if predicted is not None and math_equal(str(gold), predicted) else 0.0)
    return rewards


@_register("format")
def format_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
    """1.0 for exactly one closed, non-empty `\\boxed{}` near the end of the completion."""
    rewards: list[float | None] = []
    for completion in completions:
        text = completion_text(completion)
        boxed = find_boxed(text)
        ok = (
            len(boxed) == 1
            and boxed[0][0] is not None
            and bool(boxed[0][0].strip())
            and len(text[boxed[0][1] :].strip()) <= FORMAT_MAX_TAIL_CHARS
        )
        rewards.append(1.0 if ok else 0.0)
    return rewards


@functools.cache
def _scorer(task: str) -> Callable[[str | None, dict[str, Any]], float]:
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


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
    rewards: list[float | None] = []
    for completion, gold, row_task, meta, question in zip(
        completions, answer, tasks, metas, problems, strict=True
    ):
        if not row_task or meta is None:
            rewards.append(None)
            continue
        entry = {
            "question": question,
            "answer": gold,
            "metadata": json.loads(meta) if isinstance(meta, str) else meta,
        }
        predicted = extract_answer(completion_text(completion))
        try:
            rewards.append(float(_scorer(row_task)(predicted, entry)))
        except Exception:  # a scorer bug on odd output is a wrong answer, not a crash
            logger.debug("reasoning-gym scorer %s failed on %r", row_task, predicted, exc_info=True)
            rewards.append(0.0)
    return rewards


def build_reward_funcs(weights: Mapping[str, float]) -> tuple[list[RewardFunc], list[float]]:
    """Reward functions and their weights, in the mapping's order, for GRPOTrainer/GRPOConfig.

    `GRPOTrainer(reward_funcs=funcs, args=GRPOConfig(reward_weights=weights, ...))`.
    """
    funcs, values = [], []
    for name, weight in weights.items():
        if name not in REWARDS:
            raise ValueError(f"rewards.{name}: unknown reward; known: {', '.join(REWARDS)}")
        funcs.append(REWARDS[name])
        values.append(float(weight))
    if not funcs:
        raise ValueError("rewards: name at least one reward")
    return funcs, values
