"""Plain data out of the runs (`method_table`, `eval_rows`, `training_curves`, `online_iterations`,
`rm_accuracy`; no plotting, unit-tested on hand-written runs) and the markdown tables of the report.
The std is the population std (ddof=0, `statistics.pstdev`)."""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pbkd_cli.io import numbered_jsonl
from pbkd_cli.report.runs import Group, RunRecord, Warn, group_runs, significant_overrides

TRAINING_STAGES = ("sft", "train_rm", "minmax")
_PREF_ACCURACY = re.compile(r"^minmax/(rm|q)/pref_accuracy$")

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


def headroom_stats(group: Group) -> dict[tuple[str, str], Stats]:
    """Per (method, `headroom@k`) that a pipeline's evaluation sampled (`eval.num_samples` > 1), its values
    over the group's seeds."""
    found: dict[tuple[str, str], Stats] = {}
    for run in group.runs:
        methods = run.summary.get("methods")
        for name, figures in (methods.items() if isinstance(methods, dict) else ()):
            for key, value in (figures.items() if isinstance(figures, dict) else ()):
                if key.startswith("headroom@") and (value := _number(value)) is not None:
                    found.setdefault((name, key), Stats([])).values.append((run.seed, value))
    return found


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
        for (method, key), stats in headroom_stats(group).items():
            lines += [f"{_cell(method)} {key} (greedy wrong, a right sample among {key.partition('@')[2]}): "
                      f"{fmt_stats(stats)} ({fmt_per_seed(stats)}).", ""]
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


# The figures of each training stage's summary that its sweep table shows (`final/<key>`: the settled
# figures of a game), where its runs have them.
STAGE_FIGURES = {
    "sft": ("final_train_loss", "test_gold_nll"),
    "train_rm": ("heldout_accuracy", "heldout_bt_loss", "train_accuracy", "mle_loss"),
    "dpo": ("heldout_reward_accuracy", "heldout_reward_margin", "heldout_chosen_logprob_change"),
    "minmax": ("final/heldout_accuracy", "final/sample/accuracy", "final/reward/right_over_wrong",
               "final/pg/positive_on_wrong"),
    "collect_prefs": ("pairs", "teacher_sample_accuracy", "student_sample_accuracy"),
}


def _figure(summary: dict, key: str) -> float | None:
    if key.startswith("final/"):
        final = summary.get("final")
        return _number(final.get(key[len("final/"):])) if isinstance(final, dict) else None
    return _number(summary.get(key))


def stage_section(runs: list[RunRecord]) -> list[str]:
    """One table per training stage run on its own (a sweep, seeds): a row per group of runs (their
    differing overrides), its figures as mean ± std over the group's runs."""
    lines = []
    for stage, keys in STAGE_FIGURES.items():
        stage_runs = [r for r in runs if r.stage == stage]
        if not stage_runs:
            continue
        groups, common = group_runs(stage_runs)
        shown = [k for k in keys if any(_figure(r.summary, k) is not None for r in stage_runs)]
        lines += [f"## {stage} runs", "",
                  f"Mean ± std over each group's runs ({STD_NOTE})"
                  + (f"; every run shares {' '.join(f'`{o}`' for o in common)}." if common else "."), "",
                  "| runs | n | " + " | ".join(_cell(k) for k in shown) + " |",
                  "| --- | ---: |" + " ---: |" * len(shown)]
        for group in groups:
            cells = []
            for key in shown:
                values = [(r.seed, v) for r in group.runs if (v := _figure(r.summary, key)) is not None]
                cells.append("—" if not values else f"{values[0][1]:.4g}" if len(values) == 1
                             else fmt_stats(Stats(values), 4))
            lines.append(f"| {_cell(_code(group.label))} | {len(group.runs)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


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
    lines += stage_section([r for r in tops if r.finished and r.stage not in ("pipeline", "eval")])
    lines += ["## Plots", ""]
    if plots:
        for title, name in plots:
            lines += [f"### {title}", "", f"[{name}]({name})", "", f"![{title}]({name})", ""]
    else:
        lines += ["No plots: these runs hold no training metrics, online iterations or RM accuracies.", ""]
    if warnings:
        lines += ["## Warnings", "", *(f"- {_cell(w)}" for w in warnings), ""]
    return "\n".join(lines).rstrip("\n") + "\n"
