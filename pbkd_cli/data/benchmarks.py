"""Evaluation benchmarks beyond the training task, read from the hub or a local JSONL file.

Three families, each normalised to one record type whatever the source's column names:
  - `gsm8k`: word problems scored by exact match of the final number (GSM8K's format);
  - `multiple_choice`: a question and choices scored by log-likelihood (ARC: `choices.text/label`
    and `answerKey`; MMLU: `choices` list and `answer` index; or `question/choices/answer` as text);
  - `instruction`: an instruction (plus optional context) and a reference answer scored by ROUGE-L
    (Dolly: `instruction/context/response`; Self-Instruct / Alpaca: `instruction/input/output`;
    Vicuna-style: `prompt/completion`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pbkd_cli.config.schema import BenchmarkConfig, BenchmarkKind
from pbkd_cli.data.examples import DataError
from pbkd_cli.io import numbered_jsonl


@dataclass(frozen=True)
class ChoiceItem:
    id: str
    question: str
    choices: list[str]
    answer: int  # index into choices


@dataclass(frozen=True)
class InstructionItem:
    id: str
    instruction: str
    context: str
    reference: str


def _rows(cfg: BenchmarkConfig, key: str) -> list[tuple[str, dict]]:
    """(where, row) pairs: `file line N` for a local file, `hub row N` for the hub."""
    if cfg.path is not None:
        path = Path(cfg.path).expanduser()
        return [(f"{key}.path={path} line {n}", row) for n, row in numbered_jsonl(path, f"{key}.path")]
    if cfg.hub_id is None:
        raise DataError(f"{key}: set path (a local JSONL file) or hub_id (a hub data set)")
    from datasets import load_dataset

    data = load_dataset(cfg.hub_id, cfg.hub_config, split=cfg.split)
    return [(f"{key}.hub_id={cfg.hub_id} row {n}", dict(row)) for n, row in enumerate(data, start=1)]


def _text(row: dict, where: str, *names: str, required: bool = True) -> str:
    for name in names:
        if isinstance(row.get(name), str):
            return row[name]
    if required:
        raise DataError(f"{where}: no string field {' or '.join(repr(n) for n in names)}")
    return ""


def _choice_item(row: dict, where: str, index: int) -> ChoiceItem:
    question = _text(row, where, "question")
    choices, answer = row.get("choices"), row.get("answer", row.get("answerKey"))
    if isinstance(choices, dict):  # ARC: {"text": [...], "label": ["A", ...]}, answerKey "B"
        labels, choices = list(choices.get("label", [])), choices.get("text")
        answer = labels.index(answer) if answer in labels else answer
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of at least two strings (or ARC's text/label)")
    if isinstance(answer, str) and answer in choices:  # the answer given as the choice's text
        answer = choices.index(answer)
    if isinstance(answer, str) and len(answer) == 1 and answer.isalpha():  # a letter, MMLU-style
        answer = ord(answer.upper()) - ord("A")
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise DataError(f"{where}: 'answer' must name one of the {len(choices)} choices (index, letter or text)")
    return ChoiceItem(id=str(row.get("id", index)), question=question, choices=choices, answer=answer)


def _instruction_item(row: dict, where: str, index: int) -> InstructionItem:
    return InstructionItem(
        id=str(row.get("id", index)),
        instruction=_text(row, where, "instruction", "prompt"),
        context=_text(row, where, "context", "input", required=False),
        reference=_text(row, where, "response", "output", "completion"),
    )


def load_benchmark(cfg: BenchmarkConfig, key: str) -> list:
    """The items of one benchmark (gsm8k: `Example`s), cut to `limit`; bad rows name their line."""
    if cfg.kind == BenchmarkKind.gsm8k:
        from pbkd_cli.data.gsm8k import load_gsm8k

        return load_gsm8k(cfg.split, path=cfg.path, hub_id=cfg.hub_id or "openai/gsm8k",
                          hub_config=cfg.hub_config or "main", limit=cfg.limit, path_key=f"{key}.path",
                          hub_key=f"{key}.hub_id")
    rows = _rows(cfg, key)[: cfg.limit]
    build = _choice_item if cfg.kind == BenchmarkKind.multiple_choice else _instruction_item
    items = [build(row, where, index) for index, (where, row) in enumerate(rows)]
    if not items:
        raise DataError(f"{key}: no items")
    return items


def instruction_prompt(item: InstructionItem, template: str) -> str:
    """The prompt of an instruction item; the context, when there is one, follows the instruction."""
    instruction = item.instruction if not item.context else f"{item.instruction}\n\n{item.context}"
    return template.format(instruction=instruction)
