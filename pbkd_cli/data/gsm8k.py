"""GSM8K: grade-school math word problems whose worked solutions end in `#### <answer>`.

Read from the Hugging Face hub (`openai/gsm8k`, config `main`) or from a local JSONL file in the
hub's format: one object per line with `question` and `answer`, the latter the worked solution.
`extract_answer` is also how every stage grades a model's output, on either task.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from itertools import islice
from pathlib import Path
from typing import Iterable

from pbkd_cli.data.examples import DataError, Example

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


def _local_rows(path: Path, limit: int | None) -> list[tuple[str, dict]]:
    """The first `limit` JSON objects of a JSONL file, each with the line it came from."""
    if not path.is_file():
        raise DataError(f"data.path={path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            where = f"data.path={path} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            rows.append((where, row))
    if not rows and limit != 0:
        raise DataError(f"data.path={path}: empty file, no examples")
    return rows


def _hub_rows(hub_id: str, hub_config: str, split: str, limit: int | None) -> Iterable[tuple[str, dict]]:
    from datasets import load_dataset  # heavy import, only for runs that read the hub

    dataset = load_dataset(hub_id, hub_config, split=split)
    return ((f"{hub_id}[{split}] row {index}", row) for index, row in enumerate(islice(dataset, limit)))


def load_gsm8k(split: str, path: str | None = None, hub_id: str = "openai/gsm8k", hub_config: str = "main",
               limit: int | None = None, strip_annotations: bool = True) -> list[Example]:
    """GSM8K `split` ("train" or "test") from the local JSONL `path` when given, else from the hub.

    Bad data raises DataError (a ValueError) naming the file and line.
    """
    rows = _local_rows(Path(path), limit) if path is not None else _hub_rows(hub_id, hub_config, split, limit)
    return [_example(row, where, f"gsm8k-{split}-{index}", strip_annotations)
            for index, (where, row) in enumerate(rows)]
