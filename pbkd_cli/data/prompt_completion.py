"""Prompt-completion data in TRL's formats (`data.task=custom`), from a local JSONL file per split or a
hub data set. A row is one of

  {"prompt": "...", "completion": "..."}                                   standard
  {"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", ...}]}   conversational
  {"prompt": [{"role": ..., "content": ...}, ...], "completion": [{"role": "assistant", ...}]}

optionally with "id" and "answer" (the final number exact-match evaluation compares; without it, the
last number of the completion, or none). The prompt is kept as its turns (`Example.messages`): a
standard prompt is one user turn, used verbatim, or through the chat template with
`data.use_chat_template`; the completion is the response, verbatim.
"""

from __future__ import annotations

from pathlib import Path

from pbkd_cli.data.examples import DataError, Example
from pbkd_cli.data.gsm8k import extract_answer
from pbkd_cli.data.sources import HubUnavailable, hub_rows, local_rows

ROLES = ("system", "user", "assistant", "tool")


def conversation(value, where: str, key: str) -> tuple[tuple[str, str], ...]:
    """(role, content) turns of a TRL conversational field; one line naming the row and key otherwise."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: '{key}' must be a non-empty list of {{'role', 'content'}} messages")
    turns = []
    for n, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                or message.get("role") not in ROLES:
            raise DataError(f"{where}: '{key}'[{n}] must be {{'role': one of {', '.join(ROLES)}, 'content': str}}")
        turns.append((message["role"], message["content"]))
    return tuple(turns)


def completion_text(value, where: str, key: str = "completion") -> str:
    """A completion as text: a string, or the contents of its assistant messages."""
    if isinstance(value, str):
        return value
    turns = conversation(value, where, key)
    if any(role != "assistant" for role, _ in turns):
        raise DataError(f"{where}: '{key}' may hold assistant messages only")
    return "".join(content for _, content in turns)


def example_from_row(row: dict, where: str, example_id: str) -> Example:
    if "messages" in row:
        turns = conversation(row["messages"], where, "messages")
        if turns[-1][0] != "assistant" or len(turns) < 2:
            raise DataError(f"{where}: 'messages' must end in the assistant's response, after at least one turn")
        prompt, completion = turns[:-1], turns[-1][1]
    elif "prompt" in row and "completion" in row:
        prompt = ((("user", row["prompt"]),) if isinstance(row["prompt"], str)
                  else conversation(row["prompt"], where, "prompt"))
        completion = completion_text(row["completion"], where)
    else:
        raise DataError(f"{where}: expected 'prompt' and 'completion', or 'messages' (TRL's formats)")
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise DataError(f"{where}: 'answer' must be a string or a number")
    answer = extract_answer(str(answer)) if answer is not None else extract_answer(completion)
    users = [content for role, content in prompt if role == "user"]
    return Example(id=str(row.get("id", example_id)), question=users[-1] if users else prompt[-1][1],
                   solution=completion, answer=answer or "", messages=prompt)


def load_prompt_completion(split: str, path: str | None, hub_id: str, hub_config: str | None,
                           limit: int | None = None, path_key: str = "data.path",
                           hub_key: str = "data.hub_id") -> list[Example]:
    """`split` from the local JSONL `path` when given, else from the hub data set `hub_id`."""
    if path is None and hub_id is None:
        # As a hub that cannot be read: a stage that can do without this split (sft's test figure) does.
        raise HubUnavailable(f"{path_key}: not set, and no {hub_key} to read the {split} split from")
    rows = (local_rows(Path(path), limit, path_key) if path is not None
            else hub_rows(hub_id, hub_config, split, limit, hub_key, path_key))
    return [example_from_row(row, where, f"custom-{split}-{index}") for index, (where, row) in enumerate(rows)]
