"""The one record type every task yields, and the error that bad task data raises."""

from __future__ import annotations

from dataclasses import dataclass

from pbkd_cli.io import PbkdError


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    solution: str  # the full worked solution, ending in "#### <answer>"
    answer: str  # the normalised final number, as `gsm8k.extract_answer` writes it


class DataError(PbkdError, ValueError):
    """Malformed task data or task settings.

    A ValueError for library callers, and a PbkdError so that the CLI reports it as one line.
    """
