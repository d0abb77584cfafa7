"""The report's plots (matplotlib, Agg): training curves, online rounds, reward-model accuracy."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable

from pbkd_cli.report.runs import RunRecord, Warn
from pbkd_cli.report.tables import RmAccuracy, Series, online_iterations, rm_accuracy, training_curves

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
