"""The one record type every task yields, and the error that bad task data raises."""

from __future__ import annotations

from dataclasses import dataclass

from pbkd_cli.io import PbkdError


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    solution: str  # the reference response (a worked solution ending in "#### <answer>" for the math tasks)
    answer: str  # the normalised final number, as `gsm8k.extract_answer` writes it ("" where there is none)
    # Prompt-completion data (`data.task=custom`): the (role, content) turns before the response, taken
    # verbatim (and through the chat template with `data.use_chat_template`) instead of
    # `data.prompt_template`; `question` is then the last user turn.
    messages: tuple[tuple[str, str], ...] = ()


class DataError(PbkdError, ValueError):
    """Malformed task data or task settings.

    A ValueError for library callers, and a PbkdError so that the CLI reports it as one line.
    """
