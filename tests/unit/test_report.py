"""`pbkd report` on run directories written by hand (no training): tables, groups, plots, errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pbkd_cli.report import ReportError, write_report
from pbkd_cli.report.runs import find_runs, group_runs
from pbkd_cli.report.tables import eval_rows, method_table, online_iterations, read_metrics, rm_accuracy, training_curves

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- fixture runs --------------------------------------------------------------------------------

def write_run(run_dir: Path, stage: str, seed: int, overrides: list[str], summary: dict,
              metrics: list[dict | str] = (), started: str = "2025-01-01T00:00:00") -> Path:
    """A run directory as `Run` leaves it: config.yaml, run_info.json, metrics.jsonl, summary.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"stage": stage, "seed": seed, "trainer": {"lr": 0.001}}))
    (run_dir / "run_info.json").write_text(json.dumps({"stage": stage, "seed": seed, "overrides": overrides,
                                                       "started": started}))
    (run_dir / "metrics.jsonl").write_text(
        "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in metrics))
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "timing.json").write_text(json.dumps({"wall_seconds": 1.0}))
    return run_dir


def write_pipeline(run_dir: Path, seed: int, accuracy: dict[str, float], extra: list[str] = (),
                   rm_heldout: float = 0.6, headroom: float | None = None) -> Path:
    """A pipeline run with the steps the report reads: SFT, RM fit, offline and online PbKD, evals."""
    parent = ["stage=pipeline", "+exp=demo", "logger.mode=disabled", *extra, f"seed={seed}",
              f"hydra.run.dir={run_dir}"]
    step_overrides = [o for o in parent if o != "stage=pipeline"]
    methods = {name: {"accuracy": acc, "n": 200, "run_dir": str(run_dir / "eval" / name.replace(" ", "_"))}
               for name, acc in accuracy.items()}
    if headroom is not None:
        methods["vanilla KD"].update({"pass@16": 0.9, "headroom@16": headroom})
    write_run(run_dir, "pipeline", seed, parent,
              {"variant": "black_box", "methods": methods, "rm_heldout_accuracy": rm_heldout})
    write_run(run_dir / "vanilla_kd", "sft", seed, ["stage=sft", *step_overrides],
              {"model_dir": "m", "final_train_loss": 1.0},
              [{"step": s, "sft/loss": 3.0 - s / 10 - seed / 100, "sft/lr": 1e-3} for s in (2, 4, 6)],
              started="2025-01-01T00:00:01")
    write_run(run_dir / "train_rm", "train_rm", seed, ["stage=train_rm", *step_overrides],
              {"heldout_accuracy": rm_heldout, "mle_loss": 0.5, "model_dir": "rm"},
              [{"step": s, "rm/bt_loss": 0.7 - s / 100, "rm/accuracy": 0.5 + s / 100} for s in (1, 2, 3)],
              started="2025-01-01T00:00:02")
    write_run(run_dir / "pbkd_offline", "minmax", seed, ["stage=minmax", *step_overrides],
              {"iterations": 3, "model_dir": "s", "rm_dir": "r", "final": {"rm/gap": 0.1}},
              [{"step": s, "minmax/rm/gap": 0.1 * s, "minmax/rm/pref_accuracy": 0.6 + 0.01 * s,
                "minmax/reward/mean": -0.1 * s, "minmax/sample/accuracy": 0.3 + 0.02 * s} for s in (1, 2, 3)],
              started="2025-01-01T00:00:03")
    iterations = [{"iteration": t, "pairs": 40, "student_sample_accuracy": 0.4 + t / 100,
                   "rm_heldout_accuracy": 0.6 - t / 100, "rm/pref_accuracy": 0.7, "sample/accuracy": 0.45,
                   "reward/mean": 0.2} for t in (1, 2)]
    write_run(run_dir / "pbkd_online", "online", seed, ["stage=online", *step_overrides],
              {"iterations": iterations, "model_dir": "s", "rm_dir": "r", "prefs_path": "p"},
              [{"step": it["iteration"], **{f"online/{k}": v for k, v in it.items()}} for it in iterations],
              started="2025-01-01T00:00:04")
    for name, acc in accuracy.items():
        write_run(run_dir / "eval" / name.replace(" ", "_"), "eval", seed, ["stage=eval", *step_overrides],
                  {"model": "student", "name_or_path": None, "split": "test", "n": 200, "accuracy": acc},
                  [{"step": 0, "eval/accuracy": acc}], started="2025-01-01T00:00:05")
    return run_dir


SEEDS = {  # seed -> method -> accuracy
    0: {"teacher": 0.9, "vanilla KD": 0.60, "PbKD offline": 0.5},
    1: {"teacher": 0.9, "vanilla KD": 0.65, "PbKD offline": 0.6},
    2: {"teacher": 0.9, "vanilla KD": 0.70, "PbKD offline": 0.4},
}


@pytest.fixture
def seeds_multirun(tmp_path) -> Path:
    """A Hydra multirun of three pipeline seeds: jobs 0/, 1/, 2/ and multirun.yaml."""
    root = tmp_path / "seeds"
    for job, (seed, accuracy) in enumerate(SEEDS.items()):
        write_pipeline(root / str(job), seed, accuracy, rm_heldout=[0.6, 0.7, 0.8][seed],
                       headroom=[0.02, 0.03, 0.04][seed])
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    return root


@pytest.fixture
def sweep_multirun(tmp_path) -> Path:
    """A sweep of minmax.clip_eps (0.1, 0.2) x seeds (0, 1)."""
    root = tmp_path / "sweep"
    job = 0
    for clip, offline in (("0.1", (0.5, 0.7)), ("0.2", (0.2, 0.3))):
        for seed in (0, 1):
            write_pipeline(root / str(job), seed, {"teacher": 0.9, "PbKD offline": offline[seed]},
                           extra=[f"minmax.clip_eps={clip}"])
            job += 1
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    return root


@pytest.fixture
def eval_runs(tmp_path) -> Path:
    root = tmp_path / "evals"
    write_run(root / "a", "eval", 0, ["stage=eval", "model.student.name_or_path=/models/a", "seed=0"],
              {"model": "student", "name_or_path": "/models/a", "split": "test", "n": 10, "accuracy": 0.5,
               "overlong_prompts": 0, "finished_fraction": 0.9, "mean_response_tokens": 12.25})
    write_run(root / "b", "eval", 0, ["stage=eval", "model.student.name_or_path=/models/b", "seed=0"],
              {"model": "student", "name_or_path": "/models/b", "split": "test", "n": 10, "accuracy": 0.75,
               "overlong_prompts": 0, "finished_fraction": 1.0, "mean_response_tokens": 10.5,
               "sampled_accuracy": 0.625, "maj@4": 0.8})
    return root


def no_warning(message: str) -> None:
    raise AssertionError(f"unexpected warning: {message}")


# -- aggregation ---------------------------------------------------------------------------------

def test_seeds_pool_into_one_group_with_population_std(seeds_multirun):
    runs = find_runs([seeds_multirun], no_warning)
    assert [r.stage for r in runs] == ["pipeline"] * 3
    assert [r.seed for r in runs] == [0, 1, 2]
    assert sorted(s.step for s in runs[0].steps) == sorted(
        ["vanilla_kd", "train_rm", "pbkd_offline", "pbkd_online", "eval/teacher", "eval/vanilla_KD",
         "eval/PbKD_offline"])
    groups, common = group_runs(runs)
    assert len(groups) == 1 and common == ("+exp=demo",)     # seed, hydra.*, stage, logger.* dropped
    assert groups[0].label == "+exp=demo"
    table = method_table(groups[0])
    assert list(table) == ["teacher", "vanilla KD", "PbKD offline"]
    vanilla = table["vanilla KD"].accuracy
    assert vanilla.n == 3 and vanilla.values == [(0, 0.60), (1, 0.65), (2, 0.70)]
    assert vanilla.mean == pytest.approx(0.65)
    assert vanilla.std == pytest.approx(math.sqrt((0.05 ** 2 + 0 + 0.05 ** 2) / 3))   # ddof=0
    offline = table["PbKD offline"].accuracy
    assert offline.mean == pytest.approx(0.5)
    assert offline.std == pytest.approx(math.sqrt((0.0 + 0.1 ** 2 + 0.1 ** 2) / 3))
    assert table["teacher"].accuracy.std == 0.0


def test_report_table_values(seeds_multirun, tmp_path):
    out = write_report([seeds_multirun], tmp_path / "out", warn=no_warning)
    text = (out / "report.md").read_text()
    # By hand: vanilla KD mean (0.60+0.65+0.70)/3 = 0.65, pstdev sqrt(2*0.05^2/3) = 0.0408;
    # PbKD offline mean 0.5, pstdev sqrt(2*0.1^2/3) = 0.0816.
    assert "| teacher | 0.900 ± 0.000 | 3 | 0: 0.900, 1: 0.900, 2: 0.900 | 200 |" in text
    assert "| vanilla KD | 0.650 ± 0.041 | 3 | 0: 0.600, 1: 0.650, 2: 0.700 | 200 |" in text
    assert "| PbKD offline | 0.500 ± 0.082 | 3 | 0: 0.500, 1: 0.600, 2: 0.400 | 200 |" in text
    assert "ddof=0" in text and "statistics.pstdev" in text
    # RM held-out accuracy 0.6, 0.7, 0.8: mean 0.7, pstdev sqrt(0.02/3) = 0.0816.
    assert "RM held-out pairwise accuracy: 0.700 ± 0.082 (0: 0.600, 1: 0.700, 2: 0.800)." in text
    # Vanilla KD's headroom@16 0.02, 0.03, 0.04: mean 0.03, pstdev sqrt(0.0002/3) = 0.0082.
    assert ("vanilla KD headroom@16 (greedy wrong, a right sample among 16): 0.030 ± 0.008 "
            "(0: 0.020, 1: 0.030, 2: 0.040).") in text
    assert "## Evaluations" not in text      # the pipelines' eval steps are in the method table, not here


def test_sweep_gets_one_group_per_point(sweep_multirun, tmp_path):
    runs = find_runs([sweep_multirun], no_warning)
    groups, common = group_runs(runs)
    assert common == ("+exp=demo",)
    assert [g.label for g in groups] == ["minmax.clip_eps=0.1", "minmax.clip_eps=0.2"]
    assert [[r.seed for r in g.runs] for g in groups] == [[0, 1], [0, 1]]
    low, high = (method_table(g)["PbKD offline"].accuracy for g in groups)
    assert (low.mean, low.std) == (pytest.approx(0.6), pytest.approx(0.1))
    assert (high.mean, high.std) == (pytest.approx(0.25), pytest.approx(0.05))

    text = (write_report([sweep_multirun], tmp_path / "out", warn=no_warning) / "report.md").read_text()
    assert "| method | `minmax.clip_eps=0.1` | `minmax.clip_eps=0.2` |" in text
    assert "| PbKD offline | 0.600 ± 0.100 (2) | 0.250 ± 0.050 (2) |" in text
    assert "### `minmax.clip_eps=0.1` (2 runs)" in text and "### `minmax.clip_eps=0.2` (2 runs)" in text
    assert "| PbKD offline | 0.600 ± 0.100 | 2 | 0: 0.500, 1: 0.700 | 200 |" in text


def test_runs_from_several_paths_pool_and_are_counted_once(seeds_multirun, sweep_multirun):
    runs = find_runs([seeds_multirun, sweep_multirun, seeds_multirun / "1"], no_warning)
    assert len(runs) == 3 + 4
    groups, _ = group_runs(runs)
    assert [g.label for g in groups] == ["(no other overrides)", "minmax.clip_eps=0.1", "minmax.clip_eps=0.2"]


def test_eval_runs_table(eval_runs, tmp_path):
    rows, metrics = eval_rows(find_runs([eval_runs], no_warning))
    assert [r.model for r in rows] == ["/models/a", "/models/b"]
    assert metrics == ["accuracy", "finished_fraction", "mean_response_tokens", "sampled_accuracy", "maj@4"]
    assert rows[0].metrics["accuracy"].mean == 0.5 and "sampled_accuracy" not in rows[0].metrics

    out = write_report([eval_runs], tmp_path / "out", warn=no_warning)
    text = (out / "report.md").read_text()
    assert ("| model | split | runs | accuracy | finished_fraction | mean_response_tokens | sampled_accuracy "
            "| maj@4 |") in text
    assert "| `/models/a` | test | 1 | 0.500 | 0.900 | 12.250 | — | — |" in text
    assert "| `/models/b` | test | 1 | 0.750 | 1.000 | 10.500 | 0.625 | 0.800 |" in text
    # No training metrics, online iterations or RM figures: no plot, and no error.
    assert not list(out.glob("*.png"))
    assert "No plots" in text


def test_eval_runs_of_one_model_over_seeds_pool(tmp_path):
    for seed, acc in ((0, 0.5), (1, 0.7)):
        write_run(tmp_path / "ev" / str(seed), "eval", seed, ["stage=eval", f"seed={seed}"],
                  {"model": "student", "name_or_path": "/m", "split": "test", "n": 10, "accuracy": acc})
    rows, _ = eval_rows(find_runs([tmp_path / "ev"], no_warning))
    assert len(rows) == 1 and rows[0].metrics["accuracy"].values == [(0, 0.5), (1, 0.7)]
    text = (write_report([tmp_path / "ev"], tmp_path / "out", warn=no_warning) / "report.md").read_text()
    assert "| `/m` | test | 2 | 0.600 ± 0.100 |" in text


def test_curves_online_and_rm_figures(seeds_multirun):
    runs = find_runs([seeds_multirun], no_warning)
    from pbkd_cli.report.runs import assign_labels

    assign_labels(runs)
    assert [r.label for r in runs] == ["seed=0", "seed=1", "seed=2"]
    curves = training_curves(runs, no_warning)
    assert list(curves) == ["vanilla_kd (sft)", "train_rm (train_rm)", "pbkd_offline (minmax)"]
    assert set(curves["pbkd_offline (minmax)"]) == {"minmax/rm/gap", "minmax/rm/pref_accuracy",
                                                    "minmax/reward/mean", "minmax/sample/accuracy"}
    loss = curves["vanilla_kd (sft)"]["sft/loss"]
    assert [s.label for s in loss] == ["seed=0", "seed=1", "seed=2"]
    assert loss[1].x == [2, 4, 6] and loss[1].y == pytest.approx([2.79, 2.59, 2.39])

    online = online_iterations(runs)
    assert set(online) == {"student_sample_accuracy", "rm_heldout_accuracy", "rm/pref_accuracy", "sample/accuracy"}
    assert online["student_sample_accuracy"][0].x == [1, 2]
    assert online["student_sample_accuracy"][0].y == pytest.approx([0.41, 0.42])

    rm = rm_accuracy(runs, no_warning)
    assert rm.heldout == {"train_rm": [("seed=0", 0.6), ("seed=1", 0.7), ("seed=2", 0.8)]}
    assert list(rm.pref) == ["minmax/rm/pref_accuracy in pbkd_offline"]
    assert rm.pref["minmax/rm/pref_accuracy in pbkd_offline"][0].y == pytest.approx([0.61, 0.62, 0.63])


def test_pngs_are_written_and_linked(seeds_multirun, tmp_path):
    out = write_report([seeds_multirun], tmp_path / "out", warn=no_warning)
    expected = ["curves_vanilla_kd.png", "curves_train_rm.png", "curves_pbkd_offline.png",
                "online_iterations.png", "rm_accuracy.png"]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(expected)
    text = (out / "report.md").read_text()
    for name in expected:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in text
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]   # the temp dir is gone


def test_malformed_metrics_line_is_skipped_with_a_warning(seeds_multirun, tmp_path):
    path = seeds_multirun / "0" / "pbkd_offline" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], '{"step": 2, "minmax/rm/gap": 0.', lines[2]]) + "\n")
    warnings: list[str] = []
    rows = read_metrics(path, warnings.append)
    assert [r["step"] for r in rows] == [1, 3]
    assert len(warnings) == 1 and str(path) in warnings[0] and "line 2" in warnings[0]

    warnings.clear()
    out = write_report([seeds_multirun], tmp_path / "out", warn=warnings.append)
    assert len(warnings) == 1 and f"{path} line 2" in warnings[0]
    assert f"{path} line 2" in (out / "report.md").read_text()
    runs = find_runs([seeds_multirun], no_warning)
    gap = training_curves(runs, lambda message: None)["pbkd_offline (minmax)"]["minmax/rm/gap"]
    assert [s.x for s in gap] == [[1, 3], [1, 2, 3], [1, 2, 3]]


def test_default_out_and_rerun_replace_the_report(seeds_multirun):
    first = write_report([seeds_multirun], warn=no_warning)
    assert first == seeds_multirun / "report"
    (first / "stale.txt").write_text("from an earlier report")
    second = write_report([seeds_multirun], warn=no_warning)     # report/ is not taken for a run
    assert second == first and not (second / "stale.txt").exists() and (second / "report.md").is_file()


def test_out_that_would_replace_runs_is_refused(seeds_multirun, tmp_path):
    with pytest.raises(ReportError, match="would replace the runs"):
        write_report([seeds_multirun / "0"], seeds_multirun)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ReportError, match="not an earlier report"):
        write_report([seeds_multirun], tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_unfinished_pipeline_reports_its_finished_steps(tmp_path):
    run = write_pipeline(tmp_path / "p", 0, {"teacher": 0.9})
    (run / "summary.json").unlink()
    warnings: list[str] = []
    runs = find_runs([run], warnings.append)
    assert len(runs) == 1 and not runs[0].finished and len(runs[0].steps) == 5
    assert len(warnings) == 1 and "unfinished pipeline run" in warnings[0]


def test_an_iteration_eval_adds_test_accuracy_per_online_iteration(seeds_multirun):
    for t, acc in ((1, 0.55), (2, 0.6)):
        write_run(seeds_multirun / "0" / "pbkd_online" / f"iter{t}" / "eval", "eval", 0, ["stage=eval"],
                  {"model": "student", "name_or_path": "s", "split": "test", "n": 200, "accuracy": acc})
    online = online_iterations(find_runs([seeds_multirun], no_warning))
    assert len(online["eval/accuracy"]) == 1
    assert (online["eval/accuracy"][0].x, online["eval/accuracy"][0].y) == ([1, 2], [0.55, 0.6])


def test_eval_summary_with_several_models(tmp_path):
    """An eval run that scores several models on several benchmarks: one row per model,
    `<benchmark>/<metric>` columns (plain names for the task's own benchmark)."""
    models = {"a": {"name_or_path": "/models/a", "benchmarks": {"task": {"n": 8, "accuracy": 0.25},
                                                                 "dolly": {"n": 4, "rouge_l": 0.5}}},
              "b": {"name_or_path": "/models/b", "benchmarks": {"task": {"n": 8, "accuracy": 0.75},
                                                                 "dolly": {"n": 4, "rouge_l": 0.125}}}}
    write_run(tmp_path / "ev", "eval", 0, ["stage=eval"], {"model": "student", "split": "test", "models": models})
    rows, metrics = eval_rows(find_runs([tmp_path / "ev"], no_warning))
    assert metrics == ["accuracy", "dolly/rouge_l"]
    assert [(r.model, r.metrics["accuracy"].mean, r.metrics["dolly/rouge_l"].mean) for r in rows] == [
        ("/models/a", 0.25, 0.5), ("/models/b", 0.75, 0.125)]


# -- the command ---------------------------------------------------------------------------------

def pbkd_report(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pbkd_cli.cli", "report", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_bad_paths_are_one_line_errors(tmp_path):
    missing = tmp_path / "missing"
    result = pbkd_report(str(missing), cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: report: {missing}: no such file or directory"]

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    result = pbkd_report(str(tmp_path / "empty"), cwd=ROOT)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: report: {tmp_path / 'empty'}: no run found")
    assert not (tmp_path / "empty" / "report").exists()


def test_cli_writes_the_report(seeds_multirun, eval_runs, tmp_path):
    out = tmp_path / "combined"
    result = pbkd_report(str(seeds_multirun), str(eval_runs), "--out", str(out), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"report: {out / 'report.md'}"
    text = (out / "report.md").read_text()
    assert "## Pipelines: accuracy by method" in text and "## Evaluations" in text
    assert (out / "rm_accuracy.png").read_bytes()[:8] == PNG_MAGIC


def test_a_sweep_of_a_training_stage_gets_a_table_of_its_figures(tmp_path):
    for lr, accuracy in (("1e-4", (0.8, 0.9)), ("1e-3", (0.6, 0.7))):
        for seed, acc in enumerate(accuracy):
            write_run(tmp_path / "sweep" / f"{lr}-{seed}", "train_rm", seed,
                      ["stage=train_rm", "+exp=demo", f"trainer.lr={lr}", f"seed={seed}"],
                      {"train_pairs": 100, "heldout_accuracy": acc, "mle_loss": 0.5})
    write_run(tmp_path / "sweep" / "game", "minmax", 0, ["stage=minmax", "+exp=demo"],
              {"iterations": 2, "final": {"heldout_accuracy": 0.9, "sample/accuracy": 0.85}})
    text = (write_report([tmp_path / "sweep"], tmp_path / "out", warn=no_warning) / "report.md").read_text()
    assert "## train_rm runs" in text and "every run shares `+exp=demo`." in text
    assert "| runs | n | heldout_accuracy | mle_loss |" in text  # figures no run has are left out
    assert "| `trainer.lr=1e-4` | 2 | 0.8500 ± 0.0500 | 0.5000 ± 0.0000 |" in text
    assert "| `trainer.lr=1e-3` | 2 | 0.6500 ± 0.0500 | 0.5000 ± 0.0000 |" in text
    assert "## minmax runs" in text and "| `+exp=demo` | 1 | 0.9 | 0.85 |" in text
