"""Benchmark loading: each shipped format normalises to one record; bad rows name their file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pbkd_cli.config.schema import BenchmarkConfig, BenchmarkKind
from pbkd_cli.data.benchmarks import ChoiceItem, InstructionItem, instruction_prompt, load_benchmark
from pbkd_cli.io import PbkdError

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "benchmarks"


def bench(kind: BenchmarkKind, path: Path, **kw) -> BenchmarkConfig:
    return BenchmarkConfig(kind=kind, path=str(path), **kw)


def test_arc_and_mmlu_formats_become_choice_items():
    arc = load_benchmark(bench(BenchmarkKind.multiple_choice, FIXTURES / "arc.jsonl"), "arc")
    assert arc[0] == ChoiceItem(id="arc-1", question="Which gas do plants take in from the air to make food?",
                                choices=["oxygen", "carbon dioxide", "nitrogen", "helium"], answer=1)
    assert arc[2].answer == 2  # numeric labels "1", "2", "3" with answerKey "3"
    mmlu = load_benchmark(bench(BenchmarkKind.multiple_choice, FIXTURES / "mmlu.jsonl"), "mmlu")
    assert [item.answer for item in mmlu] == [2, 1, 0, 3] and mmlu[0].choices == ["10", "11", "12", "13"]


def test_dolly_self_instruct_and_vicuna_formats_become_instruction_items():
    dolly = load_benchmark(bench(BenchmarkKind.instruction, FIXTURES / "dolly.jsonl"), "dolly")
    assert dolly[0] == InstructionItem(id="0", instruction="Add the two numbers.",
                                       context="Tom has 3 apples and buys 4 more.", reference="Tom has 3 + 4 = 7 apples.")
    alpaca = load_benchmark(bench(BenchmarkKind.instruction, FIXTURES / "self_instruct.jsonl"), "si")
    assert alpaca[0].context == "12 and 5" and alpaca[0].reference == "12 - 5 = 7."
    assert alpaca[3] == InstructionItem(id="3", instruction="Translate 'thank you' into Spanish.", context="",
                                        reference="Gracias.")
    assert instruction_prompt(dolly[0], "I: {instruction}\nR:") == "I: Add the two numbers.\n\nTom has 3 apples and buys 4 more.\nR:"
    assert instruction_prompt(dolly[1], "{instruction}") == "What is the capital of France?"


def test_gsm8k_format_and_limit():
    items = load_benchmark(bench(BenchmarkKind.gsm8k, FIXTURES / "gsm8k.jsonl", split="train", limit=2), "g")
    assert len(items) == 2 and items[0].answer == "72"


@pytest.mark.parametrize("row, message", [
    ({"question": "Q", "choices": ["a"], "answer": 0}, "'choices' must be a list of at least two strings (or ARC's text/label)"),
    ({"question": "Q", "choices": ["a", "b"], "answer": 5}, "'answer' must name one of the 2 choices (index, letter or text)"),
    ({"choices": ["a", "b"], "answer": 0}, "no string field 'question'"),
])
def test_bad_multiple_choice_rows_name_their_line(tmp_path, row, message):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"question": "ok", "choices": ["a", "b"], "answer": "B"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(PbkdError) as err:
        load_benchmark(bench(BenchmarkKind.multiple_choice, path), "eval.benchmarks.mc")
    assert str(err.value) == f"eval.benchmarks.mc.path={path} line 2: {message}"


def test_a_benchmark_needs_a_source():
    with pytest.raises(PbkdError, match="eval.benchmarks.x: set path"):
        load_benchmark(BenchmarkConfig(kind=BenchmarkKind.instruction), "eval.benchmarks.x")


def test_line_numbers_count_blank_lines(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"question": "ok", "choices": ["a", "b"], "answer": 0}) + "\n\n"
                    + json.dumps({"question": "Q", "choices": ["a"], "answer": 0}) + "\n")
    with pytest.raises(PbkdError, match=r"mc.jsonl line 3: 'choices'"):
        load_benchmark(bench(BenchmarkKind.multiple_choice, path), "eval.benchmarks.mc")
