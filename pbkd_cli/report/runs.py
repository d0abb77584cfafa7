"""Finding runs and grouping them.

A run is a directory holding `config.yaml` and `summary.json`; the runs inside another run (a
pipeline's or an online run's steps) are that run's steps. `find_runs` gives the top-level runs under
the given paths, each with its steps; `group_runs` groups them by their overrides (`run_info.json`)
without the ones that do not change what is computed (`seed`, `hydra.*`, `stage`, `logger.*`,
`resume`), so seeds of one configuration pool into one mean ± std and a sweep gets one group per point.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import yaml

from pbkd_cli.io import PbkdError

# Overrides that leave a run's figures unchanged: not part of a group's identity.
_IGNORED_KEYS = {"seed", "stage", "resume"}
_IGNORED_ROOTS = {"hydra", "logger"}

Warn = Callable[[str], None]


class ReportError(PbkdError):
    """A path that cannot be reported on; one line, exit code 2."""


# -- discovery -----------------------------------------------------------------------------------

@dataclass
class RunRecord:
    dir: Path
    stage: str
    seed: int | None
    summary: dict
    overrides: list[str]
    started: str = ""
    finished: bool = True
    step: str | None = None                 # path below its top-level run, for a step
    steps: list[RunRecord] = field(default_factory=list)
    label: str = ""                         # set by `assign_labels` (a step shares its top run's)

    def all_runs(self) -> list[RunRecord]:
        """This run (when finished) and its finished steps, in the order they ran."""
        return ([self] if self.finished else []) + self.steps


def _natural(name: str) -> list:
    """Sort key that puts Hydra's job 10 after job 9."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _read_mapping(path: Path, warn: Warn) -> dict | None:
    """The JSON object of a `.json` file or the mapping of a YAML one, or None with a warning."""
    as_json = path.suffix == ".json"
    try:
        text = path.read_text(encoding="utf-8")
        value = json.loads(text) if as_json else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as exc:
        warn(f"report: {path}: unreadable ({exc}), run skipped")
        return None
    except json.JSONDecodeError as exc:
        warn(f"report: {path}: invalid JSON ({exc.msg}), run skipped")
        return None
    except yaml.YAMLError as exc:
        warn(f"report: {path}: unreadable YAML ({str(exc).splitlines()[0]}), run skipped")
        return None
    if not isinstance(value, dict):
        warn(f"report: {path}: expected {'a JSON object' if as_json else 'a mapping'}, run skipped")
        return None
    return value


def load_run(run_dir: Path, warn: Warn) -> RunRecord | None:
    """The record of one run directory, or None (with a warning) when its files cannot be read."""
    config = _read_mapping(run_dir / "config.yaml", warn)
    if config is None:
        return None
    finished = (run_dir / "summary.json").is_file()
    summary = _read_mapping(run_dir / "summary.json", warn) if finished else {}
    if summary is None:
        return None
    info = _read_mapping(run_dir / "run_info.json", warn) if (run_dir / "run_info.json").is_file() else {}
    info = info or {}
    seed = config.get("seed", info.get("seed"))
    overrides = info.get("overrides")
    return RunRecord(dir=run_dir, stage=str(config.get("stage") or info.get("stage") or "?"),
                     seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
                     summary=summary, overrides=[str(o) for o in overrides] if isinstance(overrides, list) else [],
                     started=str(info.get("started", "")), finished=finished)


def _walk(root: Path, warn: Warn, skip: set[Path]) -> list[RunRecord]:
    """Top-level runs under `root`, each with its steps attached; hidden folders are not entered."""
    found: dict[Path, RunRecord] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted((d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in skip),
                             key=_natural)
        # A finished run has summary.json; an unfinished one (run_info.json only) may hold finished steps.
        if "config.yaml" in filenames and ("summary.json" in filenames or "run_info.json" in filenames):
            record = load_run(here, warn)
            if record is not None:
                found[here] = record
    tops: list[RunRecord] = []
    for path, record in found.items():
        ancestors = [a for a in path.parents if a in found]
        if not ancestors:
            tops.append(record)
        elif record.finished:
            top = found[ancestors[-1]]
            record.step = path.relative_to(top.dir).as_posix()
            top.steps.append(record)
    kept = []
    for top in tops:
        top.steps.sort(key=lambda s: (s.started, _natural(s.step or "")))
        if not top.finished:
            if top.steps:
                warn(f"report: {top.dir}: unfinished {top.stage} run (no summary.json); "
                     f"only its {len(top.steps)} finished steps are reported")
            else:
                continue
        kept.append(top)
    return kept


def find_runs(paths: Iterable[Path], warn: Warn, skip: Iterable[Path] = ()) -> list[RunRecord]:
    """The top-level runs under every path, each counted once; a path with no run is an error."""
    skip = {Path(p).resolve() for p in skip}
    runs: list[RunRecord] = []
    for path in map(Path, paths):
        if not path.exists():
            raise ReportError(f"report: {path}: no such file or directory")
        if not path.is_dir():
            raise ReportError(f"report: {path}: not a directory (give a run, pipeline or multirun directory)")
        found = _walk(path, warn, skip)
        if not found:
            raise ReportError(f"report: {path}: no run found (no directory below it holds config.yaml "
                              f"and summary.json)")
        runs.extend(found)
    # The same run given twice, or given both alone and inside its pipeline, is reported once.
    resolved = {id(r): r.dir.resolve() for r in runs}
    unique, seen = [], set()
    for run in runs:
        where = resolved[id(run)]
        inside_another = any(other != where and other in where.parents for other in resolved.values())
        if where not in seen and not inside_another:
            seen.add(where)
            unique.append(run)
    return unique


# -- grouping ------------------------------------------------------------------------------------

def significant_overrides(overrides: Iterable[str]) -> tuple[str, ...]:
    """The overrides that define what a run computes: without seed, hydra.*, stage, logger.*, resume."""
    kept = set()
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in _IGNORED_KEYS or re.split(r"[./]", key, maxsplit=1)[0] in _IGNORED_ROOTS:
            continue
        kept.add(override)
    return tuple(sorted(kept))


@dataclass
class Group:
    key: tuple[str, ...]        # the significant overrides every run of the group shares
    label: str                  # what tells it from the other groups
    runs: list[RunRecord]


def _seed_order(run: RunRecord):
    return (run.seed is None, run.seed or 0, str(run.dir))


def group_runs(runs: list[RunRecord]) -> tuple[list[Group], tuple[str, ...]]:
    """Runs grouped by significant overrides (in the order first met), and the overrides all share.

    A group's label is its overrides less the shared ones; a single group is labelled by all of them.
    """
    by_key: dict[tuple[str, ...], list[RunRecord]] = {}
    for run in runs:
        by_key.setdefault(significant_overrides(run.overrides), []).append(run)
    if not by_key:
        return [], ()
    common = set.intersection(*(set(key) for key in by_key))
    groups = []
    for key, members in by_key.items():
        if len(by_key) == 1:
            label = " ".join(key) or "(no overrides)"
        else:
            label = " ".join(o for o in key if o not in common) or "(no other overrides)"
        groups.append(Group(key, label, sorted(members, key=_seed_order)))
    return groups, tuple(sorted(common))


def assign_labels(tops: list[RunRecord]) -> None:
    """Label each top-level run (and so its steps) by what tells it from the runs of its stage, and its seed."""
    for stage in dict.fromkeys(r.stage for r in tops):
        runs = [r for r in tops if r.stage == stage]
        groups, _ = group_runs(runs)
        for group in groups:
            for run in group.runs:
                prefix = "" if len(groups) == 1 else f"{group.label} "
                run.label = f"{prefix}seed={run.seed if run.seed is not None else '?'}"
        clashes: dict[str, list[RunRecord]] = {}
        for run in runs:
            clashes.setdefault(run.label, []).append(run)
        for same in clashes.values():
            # Runs alike in config and seed (two sweeps of one experiment) are told apart by the
            # shortest tail of their paths that differs.
            parts = [r.dir.resolve().parts for r in same]
            depth = next((d for d in range(1, max(map(len, parts)) + 1)
                          if len({p[-d:] for p in parts}) == len(parts)), None)
            for run, path in zip(same, parts):
                if len(same) > 1:
                    run.label = f"{run.label} [{'/'.join(path[-depth:]) if depth else run.dir}]"
        for run in runs:
            for step in run.steps:
                step.label = run.label
