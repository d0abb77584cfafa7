"""`pbkd report`: tables and plots over finished runs, in three layers: finding and grouping runs
(`runs`), plain data and markdown tables out of them (`tables`), plots (`plots`); `write_report` puts
them together and writes the report directory atomically."""

from __future__ import annotations

from pathlib import Path

from pbkd_cli.io import atomic_directory
from pbkd_cli.report.plots import draw_plots
from pbkd_cli.report.runs import ReportError, Warn, assign_labels, find_runs
from pbkd_cli.report.tables import render_markdown

__all__ = ["ReportError", "write_report"]

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
