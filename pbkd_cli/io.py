"""Atomic file and directory writes, and JSONL reading with line-numbered errors.

Every artefact a later stage reads is written to a temporary sibling and renamed into place, so a
crash (or a full disk) leaves either the old artefact or none, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


class PbkdError(Exception):
    """Bad input or a failed precondition: reported as one line, with a non-zero exit."""


def path_component(name: str, key: str) -> str:
    """`name`, checked to be usable as one file or directory name inside a run directory: a label or a
    benchmark name must not reach outside it (`../x`, `/abs`) or hide in odd characters."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or ".." in name:
        raise PbkdError(f"{key}: {name!r} is not a plain name (letters, digits, '.', '_', '-'; no '..' or '/')")
    return name


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def numbered_jsonl(path: str | Path, what: str = "file",
                   on_bad_line: Callable[[str], None] | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file. A bad line raises PbkdError naming
    the file and line, or, given `on_bad_line`, is reported to it with that message and skipped."""
    path = Path(path)
    if not path.is_file():
        raise PbkdError(f"{what}={path}: no such file")
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                problem = None if isinstance(row, dict) else "expected a JSON object"
            except json.JSONDecodeError as exc:
                problem = f"invalid JSON ({exc.msg})"
            if problem is None:
                yield number, row
            elif on_bad_line is None:
                raise PbkdError(f"{what}={path} line {number}: {problem}")
            else:
                on_bad_line(f"{path} line {number}: {problem}")


def read_jsonl(path: str | Path, what: str = "file") -> list[dict]:
    """Parse a JSONL file; a bad line raises PbkdError naming the file and line."""
    return [row for _, row in numbered_jsonl(path, what)]
