"""Answers a model wrote earlier, read back by id (the teacher's, which vanilla KD was trained on)."""

from __future__ import annotations

from pbkd_cli.data.examples import Example
from pbkd_cli.io import PbkdError, read_jsonl


def read_answers(path: str, key: str, examples: list[Example], per_prompt: int) -> list[list[str]]:
    """The `per_prompt` answers to each example from a JSONL of {"id", "response"} rows (e.g. sft's
    teacher_responses.jsonl), in the examples' order; a prompt with another count is an error naming it."""
    by_id: dict[str, list[str]] = {}
    for row in read_jsonl(path, key):
        by_id.setdefault(str(row.get("id")), []).append(str(row.get("response", "")))
    answers = []
    for ex in examples:
        found = by_id.get(ex.id, [])
        if len(found) != per_prompt:
            raise PbkdError(f"{key}={path}: {len(found)} answers for prompt {ex.id}, {per_prompt} expected "
                            f"(the run's teacher_samples_per_prompt)")
        answers.append(found)
    return answers
