"""Atomic file and directory writes, and JSONL reading with line-numbered errors.

Every artefact a later stage reads is written to a temporary sibling and renamed into place, so a
crash (or a full disk) leaves either the old artefact or none, never half of one; it gets the
permissions the umask gives a plain `open`, so a cluster group can read results. Text input is
UTF-8, read a bounded line at a time: invalid bytes or a line over `MAX_LINE_BYTES` are a one-line
error naming the file and line, never silently replaced or read whole into memory.
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


# Far above any task or preference row (a GSM8K row is ~1 KB, a 100k-token chat ~0.5 MB), far below
# what tokenising a row whole would cost in memory.
MAX_LINE_BYTES = 16 * 2**20


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def honour_umask(path: str | Path, directory: bool = False) -> None:
    """Give `path` (made by mkstemp / mkdtemp, which use 0600 / 0700) the mode a plain open or mkdir would.
    A file system that keeps no modes (some network mounts) refuses chmod: the private mode then stays."""
    with contextlib.suppress(OSError):
        os.chmod(path, (0o777 if directory else 0o666) & ~_UMASK)


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
        honour_umask(tmp)
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
        honour_umask(tmp, directory=True)
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def numbered_lines(path: str | Path, what: str = "file") -> Iterator[tuple[int, str]]:
    """(line number, text) for each line of a UTF-8 text file, read one bounded line at a time. Invalid
    UTF-8 or a line over MAX_LINE_BYTES raises PbkdError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise PbkdError(f"{what}={path}: no such file")
    with path.open("rb") as handle:
        for number, raw in enumerate(iter(lambda: handle.readline(MAX_LINE_BYTES + 1), b""), start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise PbkdError(f"{what}={path} line {number}: longer than {MAX_LINE_BYTES // 2**20} MiB")
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PbkdError(f"{what}={path} line {number}: not valid UTF-8 (byte {exc.start + 1} of the line)") from None


def numbered_jsonl(path: str | Path, what: str = "file",
                   on_bad_line: Callable[[str], None] | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file. A line that is not a JSON object
    raises PbkdError naming the file and line, or, given `on_bad_line`, is reported to it with that
    message and skipped; bytes that are not UTF-8 and overlong lines always raise (`numbered_lines`)."""
    for number, line in numbered_lines(path, what):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problem = None if isinstance(row, dict) else f"expected a JSON object, got {type(row).__name__}"
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
