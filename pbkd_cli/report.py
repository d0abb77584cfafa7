"""`pbkd report`: tables and plots over finished runs.

A run is a directory holding `config.yaml` and `summary.json`; the runs inside another run (a
pipeline's or an online run's steps) are that run's steps. The functions fall in three layers:

  discovery    `find_runs`: the top-level runs under the given paths, each with its steps;
  aggregation  `group_runs`, `method_table`, `eval_rows`, `training_curves`, `online_iterations`,
               `rm_accuracy`: plain data out of those runs, no plotting (unit-tested on hand-written runs);
  output       `render_markdown` and the `plot_*` functions (matplotlib, Agg), put together by
               `write_report`, which writes the report directory atomically.

Runs are grouped by their overrides (`run_info.json`) without the ones that do not change what is
computed (`seed`, `hydra.*`, `stage`, `logger.*`, `resume`), so seeds of one configuration pool into
one mean ± std and a sweep gets one group per point. The std is the population std (ddof=0,
`statistics.pstdev`).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import yaml

from pbkd_cli.io import PbkdError, atomic_directory, numbered_jsonl

TRAINING_STAGES = ("sft", "train_rm", "minmax")
# What each per-iteration figure of `online` measures (online.py records no test-set accuracy per round).
ONLINE_TITLES = {
    "student_sample_accuracy": "student sample accuracy, fresh prompts (collect)",
    "rm_heldout_accuracy": "refitted RM held-out pair accuracy",
    "sample/accuracy": "student sample accuracy in the game (settled)",
    "rm/pref_accuracy": "RM pref-pair accuracy in the game (settled)",
    "rm/rm_accuracy": "RM accuracy in the game (settled)",
    "q/pref_accuracy": "Q pref-pair accuracy in the game (settled)",
    "eval/accuracy": "student test accuracy (iteration eval)",
}
# Overrides that leave a run's figures unchanged: not part of a group's identity.
_IGNORED_KEYS = {"seed", "stage", "resume"}
_IGNORED_ROOTS = {"hydra", "logger"}
_PREF_ACCURACY = re.compile(r"^minmax/(rm|q)/pref_accuracy$")

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


def _read_json(path: Path, warn: Warn) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        warn(f"report: {path}: unreadable ({exc}), run skipped")
        return None
    except json.JSONDecodeError as exc:
        warn(f"report: {path}: invalid JSON ({exc.msg}), run skipped")
        return None
    if not isinstance(value, dict):
        warn(f"report: {path}: expected a JSON object, run skipped")
        return None
    return value


def _read_yaml(path: Path, warn: Warn) -> dict | None:
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        warn(f"report: {path}: unreadable YAML ({str(exc).splitlines()[0]}), run skipped")
        return None
    if not isinstance(value, dict):
        warn(f"report: {path}: expected a mapping, run skipped")
        return None
    return value


def load_run(run_dir: Path, warn: Warn) -> RunRecord | None:
    """The record of one run directory, or None (with a warning) when its files cannot be read."""
    config = _read_yaml(run_dir / "config.yaml", warn)
    if config is None:
        return None
    finished = (run_dir / "summary.json").is_file()
    summary = _read_json(run_dir / "summary.json", warn) if finished else {}
    if summary is None:
        return None
    info = _read_json(run_dir / "run_info.json", warn) if (run_dir / "run_info.json").is_file() else {}
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


# -- aggregation ---------------------------------------------------------------------------------

@dataclass
class Stats:
    """A figure over runs: mean and population std (ddof=0), and the (seed, value) it came from."""

    values: list[tuple[int | None, float]]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(v for _, v in self.values)

    @property
    def std(self) -> float:
        return statistics.pstdev([v for _, v in self.values])


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass
class MethodRow:
    accuracy: Stats
    n_test: list[int]               # the number of test problems each run evaluated on


def method_table(group: Group) -> dict[str, MethodRow]:
    """Per method (in the order the pipelines list them), its accuracy over the group's seeds."""
    rows: dict[str, MethodRow] = {}
    for run in group.runs:
        methods = run.summary.get("methods")
        if not isinstance(methods, dict):
            continue
        for name, figures in methods.items():
            accuracy = _number(figures.get("accuracy")) if isinstance(figures, dict) else None
            if accuracy is None:
                continue
            row = rows.setdefault(name, MethodRow(Stats([]), []))
            row.accuracy.values.append((run.seed, accuracy))
            if isinstance(figures.get("n"), int):
                row.n_test.append(figures["n"])
    return rows


def summary_stats(runs: list[RunRecord], key: str) -> Stats | None:
    """`summary[key]` over runs (those that have it as a number), or None."""
    values = [(r.seed, v) for r in runs if (v := _number(r.summary.get(key))) is not None]
    return Stats(values) if values else None


@dataclass
class EvalRow:
    model: str
    split: str
    config: str                     # overrides that tell this row from others with the same model
    runs: list[RunRecord]
    metrics: dict[str, Stats]


def eval_models(summary: dict) -> list[tuple[str, dict[str, float]]]:
    """(model, float figures) of each model an eval summary scores. A summary with `models` (one
    entry per model, figures per benchmark) gives `<benchmark>/<metric>` keys, plain ones for the
    `task` benchmark; a flat summary gives its own top-level floats."""
    def floats(figures: dict) -> dict[str, float]:
        return {k: v for k, v in figures.items() if isinstance(v, float) and math.isfinite(v)}

    def unnamed(role) -> str:
        return f"({role or 'model'} built from its config)"

    models = summary.get("models")
    if isinstance(models, dict) and models and all(isinstance(m, dict) for m in models.values()):
        entries = []
        for label, entry in models.items():
            figures: dict[str, float] = {}
            benchmarks = entry.get("benchmarks")
            for bench, values in (benchmarks.items() if isinstance(benchmarks, dict) else ()):
                if isinstance(values, dict):
                    figures.update({(k if bench == "task" else f"{bench}/{k}"): v for k, v in floats(values).items()})
            entries.append((str(entry.get("name_or_path") or label), figures))
        return entries
    return [(str(summary.get("name_or_path") or unnamed(summary.get("model"))), floats(summary))]


def eval_rows(runs: list[RunRecord]) -> tuple[list[EvalRow], list[str]]:
    """Standalone eval runs as rows (model, split, config; seeds pooled) and the float metrics found
    in their summaries, `accuracy` first."""
    def config_key(run: RunRecord) -> tuple[str, ...]:
        return tuple(o for o in significant_overrides(run.overrides)
                     if not re.match(r"^[+~]*(model\.\w+\.name_or_path|eval\.models\.[^=]+)=", o))

    keys = {id(r): config_key(r) for r in runs}
    common = set.intersection(*(set(k) for k in keys.values())) if runs else set()
    rows: dict[tuple, EvalRow] = {}
    metrics: dict[str, None] = {"accuracy": None}
    for run in runs:
        split = str(run.summary.get("split", ""))
        config = " ".join(o for o in keys[id(run)] if o not in common)
        for model, figures in eval_models(run.summary):
            row = rows.setdefault((model, split, config), EvalRow(model, split, config, [], {}))
            row.runs.append(run)
            for key, value in figures.items():
                metrics.setdefault(key, None)
                row.metrics.setdefault(key, Stats([])).values.append((run.seed, value))
    names = [m for m in metrics if any(m in row.metrics for row in rows.values())]
    return list(rows.values()), names


@dataclass
class Series:
    label: str
    x: list[float]
    y: list[float]


def read_metrics(path: Path, warn: Warn) -> list[dict]:
    """The rows of a metrics.jsonl; a malformed line is skipped with a warning naming file and line."""
    if not path.is_file():
        return []
    rows = []
    for number, row in numbered_jsonl(path, on_bad_line=lambda problem: warn(f"report: {problem}, line skipped")):
        if _number(row.get("step")) is None:
            warn(f"report: {path} line {number}: no numeric step, line skipped")
            continue
        rows.append(row)
    return rows


def metric_series(rows: list[dict], label: str) -> dict[str, Series]:
    """One series per numeric key of metrics.jsonl rows, by step; a step logged twice keeps its last row."""
    points: dict[str, dict[float, float]] = {}
    for row in rows:
        step = _number(row["step"])
        for key, value in row.items():
            if key != "step" and (value := _number(value)) is not None:
                points.setdefault(key, {})[step] = value
    return {key: Series(label, sorted(p), [p[s] for s in sorted(p)]) for key, p in points.items()}


def _training_runs(tops: list[RunRecord]) -> Iterable[tuple[str, RunRecord]]:
    """(figure name, run) for every training run: a step is named by its path, a standalone run by its stage."""
    for top in tops:
        for run in top.all_runs():
            if run.stage in TRAINING_STAGES:
                yield (f"{run.step} ({run.stage})" if run.step else run.stage), run


def training_curves(tops: list[RunRecord], warn: Warn) -> dict[str, dict[str, list[Series]]]:
    """Figure name -> metric key -> one series per run (its top-level run's label)."""
    figures: dict[str, dict[str, list[Series]]] = {}
    for name, run in _training_runs(tops):
        series = metric_series(read_metrics(run.dir / "metrics.jsonl", warn), run.label)
        for key, s in series.items():
            figures.setdefault(name, {}).setdefault(key, []).append(s)
    return figures


def online_iterations(tops: list[RunRecord]) -> dict[str, list[Series]]:
    """Per-iteration figures of online runs (`summary["iterations"]`): every key naming an accuracy
    (the student's sample accuracy on fresh prompts, the refitted RM's held-out accuracy, the game's
    settled figures), one series per online run. online.py evaluates no student per iteration; an
    eval run found inside an iteration's folder (`iter<t>/.../summary.json` of stage eval) adds its
    accuracy as `eval/accuracy`."""
    figures: dict[str, list[Series]] = {}
    for top in tops:
        online = [r for r in top.all_runs() if r.stage == "online"]
        for run in online:
            iterations = run.summary.get("iterations")
            if not isinstance(iterations, list):
                continue
            label = top.label if len(online) == 1 or run.step is None else f"{top.label} {run.step}"
            points: dict[str, dict[float, float]] = {}
            for index, figures_t in enumerate(iterations, start=1):
                if not isinstance(figures_t, dict):
                    continue
                t = _number(figures_t.get("iteration")) or float(index)
                for key, value in figures_t.items():
                    if "accuracy" in key and (value := _number(value)) is not None:
                        points.setdefault(key, {})[t] = value
            prefix = f"{run.step}/" if run.step else ""
            for step in top.steps:
                found = re.match(rf"^{re.escape(prefix)}iter(\d+)/", step.step or "")
                if found and step.stage == "eval" and (value := _number(step.summary.get("accuracy"))) is not None:
                    points.setdefault("eval/accuracy", {})[float(found.group(1))] = value
            for key, p in points.items():
                figures.setdefault(key, []).append(Series(label, sorted(p), [p[t] for t in sorted(p)]))
    return figures


@dataclass
class RmAccuracy:
    heldout: dict[str, list[tuple[str, float]]]     # train_rm step (or stage) -> (run label, heldout accuracy)
    pref: dict[str, list[Series]]                   # "<metric> in <game step>" -> one series per run


def rm_accuracy(tops: list[RunRecord], warn: Warn) -> RmAccuracy:
    heldout: dict[str, list[tuple[str, float]]] = {}
    pref: dict[str, list[Series]] = {}
    for top in tops:
        for run in top.all_runs():
            if run.stage == "train_rm" and (value := _number(run.summary.get("heldout_accuracy"))) is not None:
                heldout.setdefault(run.step or run.stage, []).append((top.label, value))
            if run.stage == "minmax":
                for key, s in metric_series(read_metrics(run.dir / "metrics.jsonl", warn), top.label).items():
                    if _PREF_ACCURACY.match(key):
                        pref.setdefault(f"{key} in {run.step or run.stage}", []).append(s)
    return RmAccuracy(heldout, pref)


# -- markdown ------------------------------------------------------------------------------------

STD_NOTE = "std is the population std over seeds (ddof=0, as `statistics.pstdev`)"


def fmt_stats(stats: Stats, digits: int = 3) -> str:
    return f"{stats.mean:.{digits}f} ± {stats.std:.{digits}f}"


def fmt_per_seed(stats: Stats, digits: int = 3) -> str:
    return ", ".join(f"{'?' if seed is None else seed}: {v:.{digits}f}" for seed, v in stats.values)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{text}`" if text and not text.startswith("(") else text


def repeated_seeds(group: Group) -> dict[int | None, list[RunRecord]]:
    """Seeds that more than one run of the group has (each such run still counts once)."""
    by_seed: dict[int | None, list[RunRecord]] = {}
    for run in group.runs:
        by_seed.setdefault(run.seed, []).append(run)
    return {seed: runs for seed, runs in by_seed.items() if len(runs) > 1}


def pipeline_section(groups: list[Group], common: tuple[str, ...]) -> list[str]:
    lines = ["## Pipelines: accuracy by method", "",
             f"Greedy exact-match accuracy on the test split, mean ± std over seeds; {STD_NOTE}.",
             f"Every pipeline run shares the overrides {' '.join(f'`{o}`' for o in common)}." if common else
             "The pipeline runs share no override.", ""]
    tables = {id(g): method_table(g) for g in groups}
    if len(groups) > 1:
        methods = list(dict.fromkeys(m for g in groups for m in tables[id(g)]))
        lines += ["### All groups (mean ± std over seeds, ddof=0; n)", "",
                  "| method | " + " | ".join(_cell(_code(g.label)) for g in groups) + " |",
                  "| --- |" + " ---: |" * len(groups)]
        for method in methods:
            cells = [f"{fmt_stats(r.accuracy)} ({r.accuracy.n})" if (r := tables[id(g)].get(method)) else "—"
                     for g in groups]
            lines.append(f"| {_cell(method)} | " + " | ".join(cells) + " |")
        lines.append("")
    for group in groups:
        seeds = len(group.runs)
        lines += [f"### {_code(group.label)} ({seeds} run{'s' if seeds != 1 else ''})", "",
                  "| method | accuracy (mean ± std, ddof=0) | n | per seed (seed: accuracy) | test n |",
                  "| --- | ---: | ---: | --- | ---: |"]
        for method, row in tables[id(group)].items():
            n_test = "/".join(str(n) for n in dict.fromkeys(row.n_test)) or "—"
            lines.append(f"| {_cell(method)} | {fmt_stats(row.accuracy)} | {row.accuracy.n} | "
                         f"{fmt_per_seed(row.accuracy)} | {n_test} |")
        rm = summary_stats(group.runs, "rm_heldout_accuracy")
        lines.append("")
        if rm is not None:
            lines += [f"RM held-out pairwise accuracy: {fmt_stats(rm)} ({fmt_per_seed(rm)}).", ""]
        lines += ["Runs: " + ", ".join(f"`{r.dir}`" for r in group.runs), ""]
        for seed, runs in repeated_seeds(group).items():
            lines += [f"Note: seed {seed} is in {len(runs)} runs of this group, each counted: "
                      + ", ".join(f"`{r.dir}`" for r in runs), ""]
    return lines


def eval_section(rows: list[EvalRow], metrics: list[str]) -> list[str]:
    with_config = any(row.config for row in rows)
    header = ["model", "split", *(["config"] if with_config else []), "runs", *metrics]
    lines = ["## Evaluations", "",
             f"One row per model (and config); several runs of one give mean ± std ({STD_NOTE}).", "",
             "| " + " | ".join(_cell(h) for h in header) + " |",
             "| --- | --- |" + (" --- |" if with_config else "") + " ---: |" * (1 + len(metrics))]
    for row in rows:
        cells = [f"`{row.model}`", row.split, *([_code(row.config)] if with_config else []), str(len(row.runs))]
        for metric in metrics:
            stats = row.metrics.get(metric)
            cells.append("—" if stats is None else f"{stats.values[0][1]:.3f}" if stats.n == 1 else fmt_stats(stats))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return [*lines, ""]


def render_markdown(tops: list[RunRecord], plots: list[tuple[str, str]], warnings: list[str],
                    sources: list[Path]) -> str:
    pipelines = [r for r in tops if r.stage == "pipeline" and r.finished]
    evals = [r for r in tops if r.stage == "eval" and r.finished]
    unfinished = sum(not r.finished for r in tops)
    others = len(tops) - len(pipelines) - len(evals) - unfinished
    lines = ["# pbkd report", "",
             f"From {', '.join(f'`{p}`' for p in sources)}: {len(pipelines)} pipeline run(s), "
             f"{len(evals)} standalone eval run(s), {others} other run(s)"
             + (f", {unfinished} unfinished run(s) (only their finished steps are plotted)." if unfinished else "."),
             ""]
    if pipelines:
        lines += pipeline_section(*group_runs(pipelines))
    if evals:
        lines += eval_section(*eval_rows(evals))
    lines += ["## Plots", ""]
    if plots:
        for title, name in plots:
            lines += [f"### {title}", "", f"[{name}]({name})", "", f"![{title}]({name})", ""]
    else:
        lines += ["No plots: these runs hold no training metrics, online iterations or RM accuracies.", ""]
    if warnings:
        lines += ["## Warnings", "", *(f"- {_cell(w)}" for w in warnings), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


# -- plots ---------------------------------------------------------------------------------------

def _figure(panels: int, ncols: int = 4, size: tuple[float, float] = (3.4, 2.5)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(1, min(ncols, panels))
    nrows = math.ceil(panels / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _colours(labels: Iterable[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    labels = list(dict.fromkeys(labels))
    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def _save(fig, path: Path, labels: list[str], colours: dict[str, tuple]) -> None:
    from matplotlib.lines import Line2D

    if labels:
        handles = [Line2D([], [], color=colours[label], marker="o", markersize=3) for label in labels]
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), fontsize=7, frameon=False)
    fig.savefig(path, dpi=90)


def _draw_series(ax, title: str, series: list[Series], colours: dict[str, tuple], xlabel: str) -> None:
    for s in series:
        ax.plot(s.x, s.y, color=colours[s.label], marker="o" if len(s.x) <= 20 else None, markersize=3,
                linewidth=1.2)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=8)
    ax.set_xlabel(xlabel, fontsize=7)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def plot_series_grid(title: str, metrics: dict[str, list[Series]], path: Path, xlabel: str = "step",
                     titles: dict[str, str] | None = None) -> None:
    """One subplot per metric, one line per run."""
    fig, axes = _figure(len(metrics))
    labels = list(dict.fromkeys(s.label for series in metrics.values() for s in series))
    colours = _colours(labels)
    for ax, (key, series) in zip(axes, metrics.items()):
        _draw_series(ax, (titles or {}).get(key, key), series, colours, xlabel)
    fig.suptitle(title, fontsize=10)
    _save(fig, path, labels, colours)


def plot_rm_accuracy(rm: RmAccuracy, path: Path) -> None:
    """Held-out accuracy of every RM fit (one column per fit step, a point per run), and the RM's
    accuracy on preference pairs during the min-max games."""
    panels = (1 if rm.heldout else 0) + len(rm.pref)
    fig, axes = _figure(panels, ncols=2, size=(5.0, 3.2))
    labels = list(dict.fromkeys([label for points in rm.heldout.values() for label, _ in points]
                                + [s.label for series in rm.pref.values() for s in series]))
    colours = _colours(labels)
    axes = list(axes)
    if rm.heldout:
        ax = axes.pop(0)
        steps = list(rm.heldout)
        for i, step in enumerate(steps):
            for label, value in rm.heldout[step]:
                ax.scatter([i], [value], color=colours[label], s=18)
        ax.set_xticks(range(len(steps)), steps, rotation=30, ha="right", fontsize=7)
        ax.set_xlim(-0.5, len(steps) - 0.5)
        ax.set_title("train_rm: held-out pairwise accuracy", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax, (key, series) in zip(axes, rm.pref.items()):
        _draw_series(ax, key, series, colours, "min-max iteration")
    fig.suptitle("Reward model accuracy", fontsize=10)
    _save(fig, path, labels, colours)


def _file_name(prefix: str, name: str) -> str:
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name.split(' (')[0].replace('/', '__')).strip('_')}.png"


def draw_plots(tops: list[RunRecord], target: Path, warn: Warn) -> list[tuple[str, str]]:
    """Write every plot there is data for into `target`; (title, file name) of each."""
    plots: list[tuple[str, str]] = []
    for name, metrics in training_curves(tops, warn).items():
        file = _file_name("curves", name)
        while any(file == f for _, f in plots):
            file = file[:-4] + "_.png"
        plot_series_grid(f"Training curves: {name}", metrics, target / file)
        plots.append((f"Training curves: {name}", file))
    online = online_iterations(tops)
    if online:
        title = "Online PbKD per iteration (sample accuracies and RM accuracies)"
        plot_series_grid(title, online, target / "online_iterations.png", xlabel="online iteration",
                         titles=ONLINE_TITLES)
        plots.append((title, "online_iterations.png"))
    rm = rm_accuracy(tops, lambda message: None)   # metrics.jsonl warnings were given with the curves
    if rm.heldout or rm.pref:
        plot_rm_accuracy(rm, target / "rm_accuracy.png")
        plots.append(("Reward model accuracy", "rm_accuracy.png"))
    return plots


# -- the command ---------------------------------------------------------------------------------

def _check_out(out: Path, sources: list[Path]) -> None:
    where = out.resolve()
    for source in sources:
        if where == source.resolve() or where in source.resolve().parents:
            raise ReportError(f"report: {out}: --out would replace the runs it reports on; choose another folder")
    if out.exists():
        if not out.is_dir():
            raise ReportError(f"report: {out}: --out exists and is not a directory")
        if any(out.iterdir()) and not (out / "report.md").is_file():
            raise ReportError(f"report: {out}: --out exists and is not an earlier report (no report.md); "
                              f"choose another folder")


def write_report(paths: list[Path], out: Path | None = None, warn: Warn | None = None) -> Path:
    """Report on the runs under `paths` into `out` (default `<first path>/report`), replacing an
    earlier report there only once the new one is complete. Returns `out`."""
    if not paths:
        raise ReportError("report: no path given")
    paths = [Path(p) for p in paths]
    warnings: list[str] = []

    def collect(message: str) -> None:
        warnings.append(message)
        if warn is not None:
            warn(message)

    out = Path(out) if out is not None else paths[0] / "report"
    tops = find_runs(paths, collect, skip=[out])
    _check_out(out, paths)
    assign_labels(tops)
    with atomic_directory(out) as tmp:
        plots = draw_plots(tops, tmp, collect)
        (tmp / "report.md").write_text(render_markdown(tops, plots, warnings, paths), encoding="utf-8")
    return out
