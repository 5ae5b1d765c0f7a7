"""Prompt loading from the offline sources and local files; errors name file and row."""

from __future__ import annotations

import json
import logging
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from mtrl.config import DataConfig, OnBadRow, PromptFormat
from mtrl.data import (
    DataError,
    PromptLength,
    gsm8k_gold,
    load_prompts,
    load_prompts_with_stats,
    split_train_eval,
)
from mtrl.models import build_tiny_tokenizer


def data_cfg(**kwargs):
    return OmegaConf.structured(DataConfig(**kwargs))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [{"question": f"What is {i} + {i}?", "solution": str(2 * i), "id": i} for i in range(1, 7)]


def test_aime2025_both_papers():
    ds = load_prompts(data_cfg(source="aime2025"))
    assert len(ds) == 30
    assert ds["answer"][0] == "70"
    assert "336^\\circ" in ds["answer"]
    assert "17_{b}" in ds["problem"][0]
    assert len(load_prompts(data_cfg(source="aime2025", subset="II"))) == 15
    with pytest.raises(DataError, match="aime2025 has subsets I and II"):
        load_prompts(data_cfg(source="aime2025", subset="III"))


def test_gsm8k_gold_answers():
    ds = load_prompts(data_cfg(source="gsm8k"))
    assert len(ds) == 1319
    assert ds["answer"][:3] == ["18", "3", "70000"]  # "#### 70,000" has its comma removed
    assert all("," not in a and "####" not in a for a in ds["answer"])
    assert gsm8k_gold("so 1,234 total\n#### 1,234") == "1234"
    assert gsm8k_gold("no marker") == ""


def test_chat_and_text_prompts(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    common = dict(source=str(path), problem_column="question", answer_column="solution")
    chat = load_prompts(data_cfg(**common, system_prompt="Be brief.", template="Q: {problem}"))
    assert chat[0]["prompt"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q: What is 1 + 1?"},
    ]
    assert chat[0]["answer"] == "2"
    no_system = load_prompts(data_cfg(**common, system_prompt=None))
    assert no_system[0]["prompt"] == [{"role": "user", "content": "What is 1 + 1?"}]
    text = load_prompts(
        data_cfg(
            **common,
            prompt_format="text",
            system_prompt="Be brief.",
            template="Problem: {problem}\nAnswer in \\boxed{}.\n",
        )
    )
    assert text[0]["prompt"] == "Be brief.\n\nProblem: What is 1 + 1?\nAnswer in \\boxed{}.\n"
    raw = load_prompts(data_cfg(**common, prompt_format="text", system_prompt=None))
    assert raw[0]["prompt"] == "What is 1 + 1?"


def test_conversational_prompts_are_what_trl_expects(tmp_path):
    from trl.data_utils import is_conversational

    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    common = dict(source=str(path), problem_column="question", answer_column="solution")
    assert is_conversational(load_prompts(data_cfg(**common))[0])
    assert not is_conversational(load_prompts(data_cfg(**common, prompt_format="text"))[0])


def test_chat_needs_a_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    common = dict(source=str(path), problem_column="question", answer_column="solution")

    no_template = build_tiny_tokenizer()
    no_template.chat_template = None
    with pytest.raises(
        DataError, match="prompt_format: chat needs a tokenizer with a chat template"
    ):
        load_prompts(data_cfg(**common), no_template)
    assert len(load_prompts(data_cfg(**common, prompt_format="text"), no_template)) == 6


def bad_rows(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[2]["solution"] = ""  # row 3: empty answer
    del rows[4]["question"]  # row 5: missing problem
    rows[5]["solution"] = "   "  # row 6: blank answer
    return write_jsonl(tmp_path / "train.jsonl", rows)


def test_bad_row_names_file_and_row(tmp_path):
    path = bad_rows(tmp_path)
    cfg = data_cfg(source=str(path), problem_column="question", answer_column="solution")
    with pytest.raises(DataError) as info:
        load_prompts(cfg)
    assert str(info.value) == f"{path} row 3: empty 'solution'"
    assert isinstance(info.value, ValueError)

    rows = [dict(r) for r in ROWS]
    del rows[4]["question"]
    write_jsonl(path, rows)
    with pytest.raises(DataError, match=rf"^{path} row 5: missing 'question'$"):
        load_prompts(cfg)


def test_row_numbers_are_file_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(r) for r in ROWS[:3]]
    path.write_text(lines[0] + "\n\n" + lines[1] + "\n" + '{"question": "q"}\n')
    cfg = data_cfg(source=str(path), problem_column="question", answer_column="solution")
    with pytest.raises(DataError, match=rf"^{path} row 4: missing 'solution'$"):
        load_prompts(cfg)
    path.write_text(lines[0] + "\n" + "{not json\n")
    with pytest.raises(DataError, match=rf"^{path} row 2: not valid JSON"):
        load_prompts(cfg)


def test_skip_mode_counts_and_logs(tmp_path, caplog):
    path = bad_rows(tmp_path)
    cfg = data_cfg(
        source=str(path), problem_column="question", answer_column="solution", on_bad_row="skip"
    )
    with caplog.at_level(logging.WARNING, logger="mtrl.data"):
        ds, stats = load_prompts_with_stats(cfg)
    assert len(ds) == 3
    assert ds["answer"] == ["2", "4", "8"]
    assert stats.rows_skipped == 3 and stats.rows_kept == 3
    assert stats.skipped == [
        f"{path} row 3: empty 'solution'",
        f"{path} row 5: missing 'question'",
        f"{path} row 6: empty 'solution'",
    ]
    assert f"{path} row 5: missing 'question'" in caplog.text
    assert "skipped 3 bad row(s)" in caplog.text


def test_non_utf8_row_names_file_and_row_and_skip_counts_it(tmp_path, caplog):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(r).encode() for r in ROWS[:4]]
    lines[2] = b'{"question": "caf\xe9 + 1?", "solution": "2"}'  # Latin-1, not UTF-8
    path.write_bytes(b"\n".join(lines) + b"\n")
    common = dict(source=str(path), problem_column="question", answer_column="solution")
    with pytest.raises(DataError) as info:
        load_prompts(data_cfg(**common))
    assert str(info.value) == f"{path} row 3: not valid UTF-8 (byte 0xe9 at column 18)"
    with caplog.at_level(logging.WARNING, logger="mtrl.data"):
        ds, stats = load_prompts_with_stats(data_cfg(**common, on_bad_row="skip"))
    assert ds["answer"] == ["2", "4", "8"]
    assert (stats.rows_skipped, stats.rows_too_long, stats.rows_kept) == (1, 0, 3)
    assert f"{path} row 3: not valid UTF-8" in caplog.text
    # Invalid JSON is a bad row like any other: skipped and counted too.
    path.write_bytes(lines[0] + b"\n{not json\n" + lines[1] + b"\n")
    ds, stats = load_prompts_with_stats(data_cfg(**common, on_bad_row="skip"))
    assert (len(ds), stats.rows_skipped, stats.skipped) == (
        2,
        1,
        [f"{path} row 2: not valid JSON (Expecting property name enclosed in double quotes)"],
    )
    # A .json document has no rows to skip: file and line.
    doc = tmp_path / "doc.json"
    doc.write_bytes(b'[{"problem": "1+1?", "answer": "2"},\n {"problem": "\xff", "answer": "1"}]')
    with pytest.raises(DataError, match=rf"^{doc}: not valid UTF-8 \(byte 0xff on line 2\)$"):
        load_prompts(data_cfg(source=str(doc)))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_long_prompts_error_or_are_skipped_and_counted(tmp_path, tokenizer, caplog):
    rows = [dict(r) for r in ROWS]
    rows[1]["question"] = "What is " + " + ".join(["12"] * 40) + "?"  # ~160 tokens
    rows[3]["question"] = "7 " * 5_000_000  # 10 MB on one line
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    common = dict(source=str(path), problem_column="question", answer_column="solution")
    fits = data_cfg(**common, max_prompt_tokens=100)
    for fmt in ["chat", "text"]:
        fits.prompt_format = PromptFormat(fmt)
        with pytest.raises(DataError) as info:
            load_prompts(fits, tokenizer)
        assert re.fullmatch(
            rf"{path} row 2: prompt has \d+ tokens, more than data.max_prompt_tokens \(100\)",
            str(info.value),
        ), str(info.value)
    skip = data_cfg(**common, max_prompt_tokens=100, on_bad_row="skip")
    with caplog.at_level(logging.WARNING, logger="mtrl.data"):
        ds, stats = load_prompts_with_stats(skip, tokenizer)
    assert ds["answer"] == ["2", "6", "10", "12"]
    assert (stats.rows_skipped, stats.rows_too_long, stats.rows_kept) == (2, 2, 4)
    # The 10 MB row is refused from its length in characters, never tokenized.
    assert re.match(rf"{path} row 4: prompt of 100000\d\d characters is longer", stats.skipped[1])
    assert "2 over data.max_prompt_tokens" in caplog.text
    # A longer limit keeps row 2; no limit keeps every row.
    assert (
        len(load_prompts(data_cfg(**common, max_prompt_tokens=400, on_bad_row="skip"), tokenizer))
        == 5
    )
    assert len(load_prompts(data_cfg(**common, max_prompt_tokens=None), tokenizer)) == 6


def test_character_bound_never_refuses_a_prompt_that_fits(tokenizer):
    """The character bound is a proof: whatever it refuses has more tokens than the limit."""
    import random

    rng = random.Random(0)
    # Long vocabulary entries, near the limit: where a loose bound would refuse too much.
    vocab = sorted(tokenizer.get_vocab(), key=len, reverse=True)[:60]
    pieces = ["\\boxed{", "    ", "\n\n", "=", "é", "∑", "12345", " the"]
    for limit in [1, 3, 10, 40]:
        length = PromptLength(limit, tokenizer)
        for _ in range(200):
            n = rng.randint(1, limit + 3)
            text = tokenizer.decode(tokenizer.convert_tokens_to_ids(rng.choices(vocab, k=n)))
            text += "".join(rng.choices(pieces, k=rng.randint(0, 2)))
            reason = length.excess(text)
            tokens = len(tokenizer(text)["input_ids"])
            assert (reason is None) == (tokens <= limit), (limit, text, reason)


def test_missing_column_names_the_available_ones(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(DataError) as info:
        load_prompts(data_cfg(source=str(path), problem_column="question"))
    assert str(info.value) == (f"{path}: no column 'answer'; available: question, solution, id")
    with pytest.raises(DataError, match="no column 'questoin' \\(did you mean 'question'\\?\\)"):
        load_prompts(
            data_cfg(source=str(path), problem_column="questoin", answer_column="solution")
        )


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_prompts(data_cfg(source=str(tmp_path / "nope.jsonl")))


def test_parquet_and_json(tmp_path):
    table = pa.table(
        {
            "problem": ["1+1?", "2+2?", None, "4+4?"],
            "answer": [2, 4, 6, 8],  # numbers become strings
        }
    )
    pq.write_table(table, tmp_path / "train.parquet")
    cfg = data_cfg(source=str(tmp_path / "train.parquet"))
    with pytest.raises(DataError, match=r"train\.parquet row 3: missing 'problem'$"):
        load_prompts(cfg)
    cfg.on_bad_row = OnBadRow.skip
    ds = load_prompts(cfg)
    assert ds["answer"] == ["2", "4", "8"]

    records = [{"problem": "1+1?", "answer": "2"}, {"problem": "3+3?", "answer": 6.0}]
    (tmp_path / "list.json").write_text(json.dumps(records))
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": 1, "data": records}))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in records))
    for name in ["list.json", "wrapped.json", "lines.json"]:
        ds = load_prompts(data_cfg(source=str(tmp_path / name), prompt_format="text"))
        assert ds["answer"] == ["2", "6.0"], name
        assert ds["problem"] == ["1+1?", "3+3?"], name


def test_dataset_folder_through_load_dataset(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    rows = [dict(r) for r in ROWS]
    rows[1]["solution"] = ""
    write_jsonl(folder / "train.jsonl", rows)
    common = dict(source=str(folder), problem_column="question", answer_column="solution")
    with pytest.raises(DataError, match=rf"^{folder}\[train\] row 2: empty 'solution'$"):
        load_prompts(data_cfg(**common))
    ds = load_prompts(data_cfg(**common, on_bad_row="skip", max_samples=3))
    assert ds["answer"] == ["2", "6", "8"]
    with pytest.raises(DataError, match="no column 'answer'; available: question, solution, id"):
        load_prompts(data_cfg(source=str(folder), problem_column="question"))
    with pytest.raises(DataError, match="cannot load dataset split 'validation'"):
        load_prompts(data_cfg(**common, split="validation"))


def test_max_samples(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    ds = load_prompts(
        data_cfg(
            source=str(path), problem_column="question", answer_column="solution", max_samples=2
        )
    )
    assert ds["answer"] == ["2", "4"]


def test_reasoning_gym_is_deterministic_with_seed():
    def cfg(seed):
        return data_cfg(source="reasoning_gym", task="basic_arithmetic", size=20, seed=seed)

    first, again, other = load_prompts(cfg(7)), load_prompts(cfg(7)), load_prompts(cfg(8))
    assert len(first) == 20
    assert first.column_names == ["prompt", "problem", "answer", "task", "metadata"]
    assert first.to_list() == again.to_list()
    assert first["problem"] != other["problem"]
    assert set(first["task"]) == {"basic_arithmetic"}
    assert json.loads(first["metadata"][0])["source_dataset"] == "basic_arithmetic"
    assert first["problem"][0].startswith("Calculate")


def test_reasoning_gym_unknown_task():
    with pytest.raises(
        DataError,
        match="unknown reasoning-gym task 'basic_arithmatic' "
        "\\(did you mean 'basic_arithmetic'\\?\\)",
    ):
        load_prompts(data_cfg(source="reasoning_gym", task="basic_arithmatic"))


def test_split_train_eval():
    ds = load_prompts(data_cfg(source="aime2025"))
    train, held_out = split_train_eval(ds, test_size=6, seed=1)
    assert (len(train), len(held_out)) == (24, 6)
    assert set(train["problem"]).isdisjoint(held_out["problem"])
    again, _ = split_train_eval(ds, test_size=6, seed=1)
    assert again["problem"] == train["problem"]


def test_reasoning_gym_task_options_reach_the_generator():
    cfg = data_cfg(
        source="reasoning_gym",
        task="basic_arithmetic",
        size=40,
        task_options={"max_terms": 2, "max_digits": 1, "operators": ["+"], "allow_negation": False},
    )
    for row in load_prompts(cfg):
        numbers = (
            row["problem"].removeprefix("Calculate ").rstrip(".").replace("(", "").replace(")", "")
        )
        terms = [t for t in numbers.split() if t != "+"]
        assert len(terms) <= 2 and all(len(t.lstrip("-")) == 1 for t in terms), row["problem"]
        assert int(row["answer"]) == sum(int(t) for t in terms)
    with pytest.raises(DataError, match="data.task: reasoning-gym cannot build"):
        load_prompts(
            data_cfg(source="reasoning_gym", task="basic_arithmetic", task_options={"digits": 3})
        )


def test_eval_launcher_reports_a_bad_benchmark_row_before_loading_weights(
    tmp_path, tokenizer, monkeypatch, capsys
):
    import importlib.util
    from pathlib import Path

    from mtrl import models
    from mtrl.config import TinyModelConfig

    folder = tmp_path / "model"
    models.build_tiny_model(TinyModelConfig(), tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    bench = tmp_path / "bench.jsonl"
    bench.write_bytes(b'{"problem": "1+1?", "answer": "2"}\n{"problem": "\xff", "answer": "1"}\n')

    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded before the benchmark data was checked")

    monkeypatch.setattr(models, "load_model", refuse)
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("launch_eval", root / "launch" / "eval.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    argv = [
        str(root / "experiments" / "smoke.yaml"),
        f"model.name={folder}",
        f"eval.benchmarks=[{{source: '{bench}'}}]",
        "--no-mlflow",
    ]
    capsys.readouterr()  # save_pretrained's progress bar
    with pytest.raises(SystemExit) as info:
        launcher.main(argv)
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {bench} row 2: not valid UTF-8 (byte 0xff at column 14)\n"
    )


def test_few_shot_examples_come_before_the_problem(tmp_path):
    from mtrl.config import load_config

    path = tmp_path / "fs.yaml"
    path.write_text(
        "model: {name: tiny}\n"
        "data:\n  source: aime2025\n  max_samples: 1\n  system_prompt: Box it.\n"
        "  few_shot: [{user: 'Calculate 1 + 2.', assistant: '\\boxed{3}'}]\n"
    )
    cfg = load_config(path)
    [messages] = load_prompts(cfg.data)["prompt"][:1]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1]["content"] == "Calculate 1 + 2." and messages[2]["content"] == "\\boxed{3}"
    text = load_prompts(OmegaConf.merge(cfg.data, {"prompt_format": "text"}))["prompt"][0]
    assert text.startswith("Box it.\n\nCalculate 1 + 2.\n\\boxed{3}\n\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: tiny}\ndata: {source: aime2025, few_shot: [{user: hi}]}\n")
    with pytest.raises(ValueError, match=r"data.few_shot\[0\].assistant"):
        load_config(bad)
