"""Where task rows come from: a local JSONL file or a Hugging Face hub data set, each row with where
it came from (for one-line errors)."""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Iterable

from pbkd_cli.data.examples import DataError
from pbkd_cli.io import PbkdError, numbered_jsonl


def local_rows(path: Path, limit: int | None, key: str) -> list[tuple[str, dict]]:
    """The first `limit` JSON objects of the JSONL file `key` names, each with the line it came from."""
    try:
        rows = [(f"{key}={path} line {number}", row) for number, row in islice(numbered_jsonl(path, key), limit)]
    except PbkdError as exc:
        raise DataError(str(exc)) from None
    if not rows and limit != 0:
        raise DataError(f"{key}={path}: empty file, no examples")
    return rows


class HubUnavailable(DataError):
    """The hub's split cannot be read: offline, unreachable, or no such data set there."""


def hub_rows(hub_id: str, hub_config: str, split: str, limit: int | None, hub_key: str,
            path_key: str) -> Iterable[tuple[str, dict]]:
    from datasets import load_dataset  # heavy import, only for runs that read the hub

    try:
        dataset = load_dataset(hub_id, hub_config, split=split)
    except OSError as exc:  # ConnectionError offline or unreachable, FileNotFoundError for a missing data set
        raise HubUnavailable(f"{hub_key}={hub_id}: its {split} split cannot be read "
                             f"({str(exc).splitlines()[0][:200]}); set {path_key} to a local JSONL") from None
    return ((f"{hub_id}[{split}] row {index}", row) for index, row in enumerate(islice(dataset, limit)))
