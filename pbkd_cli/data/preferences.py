"""Preference pairs on disk in the `prompt` / `chosen` / `rejected` convention (TRL, the hub).

`PreferenceWriter` appends pairs chunk by chunk to `<name>.partial.jsonl` and survives being killed
at any moment: each chunk is appended and fsynced, then a small commit record (committed byte size
and number of prompts done) is replaced atomically. On restart, anything past the committed size
(a chunk that was being written) is cut off and that chunk is redone, so no pair is lost or
doubled. Only `finalize` moves the file to its real name, where later stages look for it.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pbkd_cli.data.prompt_completion import completion_text, conversation
from pbkd_cli.io import PbkdError, atomic_write_json, numbered_jsonl


@dataclass
class PreferencePair:
    id: str
    prompt: str  # the formatted prompt the models saw
    chosen: str
    rejected: str
    question: str = ""
    answer: str = ""
    chosen_source: str = ""  # "teacher" | "student"
    rejected_source: str = ""
    labeler: str = ""
    iteration: int = 0
    # TRL's conversational prompt ([{"role", "content"}, ...]) where the pair has one; `prompt` is then
    # its text.
    messages: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)


REQUIRED = ("prompt", "chosen", "rejected")


def load_preferences(path: str | Path, what: str = "prefs.path") -> list[PreferencePair]:
    """Read a JSONL preference file in TRL's formats: prompt/chosen/rejected as strings, or conversational
    (the prompt a list of messages, chosen and rejected lists of assistant messages). A bad line is one
    error naming its line number."""
    pairs = []
    known = set(PreferencePair.__dataclass_fields__) - {"extra"}
    for number, row in numbered_jsonl(path, what):
        where = f"{what}={path} line {number}"
        missing = [k for k in REQUIRED if not isinstance(row.get(k), (str, list))]
        if missing:
            raise PbkdError(f"{where}: missing '{missing[0]}', or neither a string nor a list of messages")
        if isinstance(row["prompt"], list):
            turns = conversation(row["prompt"], where, "prompt")
            row["messages"] = [{"role": r, "content": c} for r, c in turns]
            row["prompt"] = "\n\n".join(c for _, c in turns)
        for key in ("chosen", "rejected"):
            row[key] = completion_text(row[key], where, key)
        row.setdefault("id", f"pair-{len(pairs) + 1}")
        # Columns other tools add (scores, metadata) are kept, not dropped.
        extra = {**row.get("extra", {}), **{k: v for k, v in row.items() if k not in known | {"extra"}}}
        pairs.append(PreferencePair(**{k: v for k, v in row.items() if k in known}, extra=extra))
    if not pairs:
        raise PbkdError(f"{what}={path}: no preference pairs")
    return pairs


def split_heldout(pairs: list, fraction: float, seed: int) -> tuple[list, list]:
    """(held out, train): a seeded `fraction` of the pairs kept out of training, for the figures."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_heldout = int(len(pairs) * fraction)
    return [pairs[i] for i in order[:n_heldout]], [pairs[i] for i in order[n_heldout:]]


class PreferenceWriter:
    """Crash-safe, resumable appends of pairs, committed one chunk of prompts at a time."""

    def __init__(self, path: str | Path, read_only: bool = False):
        self.final_path = Path(path)
        self.path = self.final_path.with_name(self.final_path.stem + ".partial.jsonl")
        self.commit_path = self.final_path.with_name(self.final_path.stem + ".commit.json")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        committed = {"bytes": 0, "prompts_done": 0, "pairs": 0, "stats": {}}
        if self.commit_path.exists():
            committed = json.loads(self.commit_path.read_text())
        self.prompts_done = committed["prompts_done"]
        self.pairs = committed["pairs"]
        self.stats: dict[str, float] = committed["stats"]  # running sums committed with the pairs
        self._bytes = committed["bytes"]
        if not read_only:  # other ranks of a multi-process run only read where the writer is
            if self.commit_path.exists() and not self.path.exists() and self.final_path.exists():
                # The previous run died after publishing the file and before dropping its commit record:
                # the published file is the committed one; take it back and finalize again.
                os.replace(self.final_path, self.path)
            size = self.path.stat().st_size if self.path.exists() else 0
            if size < self._bytes:
                # Extending it would pad committed pairs with NUL bytes.
                raise PbkdError(f"{self.path}: {size} bytes where {self.commit_path.name} committed {self._bytes}; "
                                "the partial file was cut or removed, start this run in a fresh directory")
            # Cut off a chunk that was being appended when the previous run died.
            with self.path.open("ab") as handle:
                handle.truncate(self._bytes)

    def append_chunk(self, pairs: list[PreferencePair], prompts: int, stats: dict[str, float] | None = None) -> None:
        data = "".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in pairs).encode("utf-8")
        with self.path.open("ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        self._bytes += len(data)
        self.prompts_done += prompts
        self.pairs += len(pairs)
        for key, value in (stats or {}).items():
            self.stats[key] = self.stats.get(key, 0) + value
        atomic_write_json(self.commit_path, {"bytes": self._bytes, "prompts_done": self.prompts_done,
                                             "pairs": self.pairs, "stats": self.stats})

    def finalize(self) -> Path:
        os.replace(self.path, self.final_path)
        self.commit_path.unlink()
        return self.final_path
