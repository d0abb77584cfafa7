"""GSM8K: grade-school math word problems whose worked solutions end in `#### <answer>`.

Read from the Hugging Face hub (`openai/gsm8k`, config `main`) or from a local JSONL file in the
hub's format: one object per line with `question` and `answer`, the latter the worked solution.
`extract_answer` is also how every stage grades a model's output, on either task.
"""

from __future__ import annotations

import ast
import operator
import re
from decimal import Decimal
from pathlib import Path

from pbkd_cli.data.examples import DataError, Example
from pbkd_cli.data.sources import HubUnavailable, hub_rows, local_rows

__all__ = ["HubUnavailable", "extract_answer", "load_gsm8k"]

ANSWER_MARKER = "####"
# A sign counts only where it cannot be a binary minus ("12-3" holds 12 and 3, not -3). Thousands
# separators must group by three, so "3,4" stays two numbers.
_NUMBER = re.compile(r"(?:(?<![\w.])[-+])?\$?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)")
_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")


def _normalise(number: str) -> str:
    value = Decimal(number.replace(",", "").replace("$", ""))
    # normalize() drops trailing zeros ("5.00" -> "5"); ":f" keeps "10" from printing as "1E+1".
    return "0" if value == 0 else f"{value.normalize():f}"


def extract_answer(text: str) -> str | None:
    """The normalised final number of a GSM8K solution or a model's output; None if it has none.

    The first number after the first `####` marker wins; without one (or with nothing numeric
    after it), the last number in the text. "1,234" -> "1234", "$5.00." -> "5", "0.50" -> "0.5",
    "+3" -> "3", "-3" -> "-3", "50%" -> "50".
    """
    if ANSWER_MARKER in text:
        after_marker = _NUMBER.search(text.split(ANSWER_MARKER, 1)[1])
        if after_marker:
            return _normalise(after_marker.group())
    numbers = _NUMBER.findall(text)
    return _normalise(numbers[-1]) if numbers else None


_NUM = r"\d+(?:\.\d+)?"
# A whole left-hand side (numbers joined by + - * / x) then "= result"; it must not start mid-number.
_EQUATION = re.compile(rf"(?<![\w.*/+-])((?:{_NUM}\s*[-+*/x]\s*)+{_NUM})\s*=\s*(-?{_NUM})")
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        right = _evaluate(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            return float("nan")
        return _OPERATORS[type(node.op)](_evaluate(node.left), right)
    raise ValueError("not arithmetic")


def equations_hold(text: str) -> bool:
    """Whether every written `expression = result` in `text` is arithmetically true.

    A right final answer reached through a wrong step ("18 + 12 = 31. 31 - 16 = 14") is not a right
    solution; a rule-based math judge checks the steps too. Commas in numbers are ignored, `x`, `×`
    mean times and `−` minus; operator precedence is Python's.
    """
    normalised = text.replace(",", "").replace("×", "x").replace("−", "-")
    for expression, result in _EQUATION.findall(normalised):
        # Numbers as float literals: "0900" is a time of day, not a syntax error.
        expression = re.sub(_NUM, lambda m: repr(float(m.group())), expression.replace("x", "*"))
        try:
            value = _evaluate(ast.parse(expression, mode="eval"))
        except (SyntaxError, ValueError):
            continue  # not plain arithmetic after all: no verdict on it
        if not abs(value - float(result)) <= 1e-6 * max(1.0, abs(float(result))):
            return False
    return True


def strip_calculator_annotations(text: str) -> str:
    """Drop GSM8K's `<<48/2=24>>` calculator traces: tool-call residue, not reasoning to imitate."""
    return _CALCULATOR_ANNOTATION.sub("", text)


def _example(row: dict, where: str, example_id: str, strip_annotations: bool) -> Example:
    for key in ("question", "answer"):
        if key not in row:
            raise DataError(f"{where}: missing key '{key}'")
        if not isinstance(row[key], str):
            raise DataError(f"{where}: key '{key}' is not a string")
    solution = row["answer"].strip()
    if strip_annotations:
        solution = strip_calculator_annotations(solution)
    answer = extract_answer(solution.split(ANSWER_MARKER, 1)[1]) if ANSWER_MARKER in solution else None
    if answer is None:
        raise DataError(f"{where}: the solution does not end in '{ANSWER_MARKER} <number>'")
    return Example(id=example_id, question=row["question"].strip(), solution=solution, answer=answer)


def load_gsm8k(split: str, path: str | None = None, hub_id: str = "openai/gsm8k", hub_config: str = "main",
               limit: int | None = None, strip_annotations: bool = True, path_key: str = "data.path",
               hub_key: str = "data.hub_id") -> list[Example]:
    """GSM8K `split` ("train" or "test") from the local JSONL `path` when given, else from the hub.

    Bad data raises DataError (a ValueError) naming the config key (`path_key`), file and line; a hub
    that cannot be read raises HubUnavailable (a DataError) naming `hub_key`.
    """
    if path is not None:
        rows = local_rows(Path(path), limit, path_key)
    else:
        rows = hub_rows(hub_id, hub_config, split, limit, hub_key, path_key)
    return [_example(row, where, f"gsm8k-{split}-{index}", strip_annotations)
            for index, (where, row) in enumerate(rows)]
