"""Online PbKD (METHOD.md, Algorithm 2). For t = 1..T:

  1. sample fresh prompts x_t; teacher responses and current-student responses;
  2. label them (teacher preferred, or a judge);
  3. D_pref^t = D_pref^{t-1} + the new pairs; refit the RM by MLE on D_pref^t;
  4. run the min-max game from the current student and the refitted RM: the rounds' games are one
     game's stretches, with one student optimiser and one lr schedule across them.

Each iteration's artefacts live in `iter<t>/`, and a rerun in the same directory resumes at the
first step that has no `summary.json`.
"""

from __future__ import annotations

from pathlib import Path

from pbkd_cli.config.schema import PbkdConfig, Variant
from pbkd_cli.io import atomic_write_text
from pbkd_cli.runner import Run, Steps, local_model


def merge_preferences(previous: str | None, new: str, target: Path) -> Path:
    """D^t = D^{t-1} + new pairs, as one JSONL file written atomically."""
    text = Path(previous).read_text(encoding="utf-8") if previous else ""
    if text and not text.endswith("\n"):
        text += "\n"
    atomic_write_text(target, text + Path(new).read_text(encoding="utf-8"))
    return target


def run(cfg: PbkdConfig, run: Run) -> dict:
    o = cfg.online
    step = Steps(run)
    # The configured student and RM play round 1; later rounds start from the previous round's.
    student, rm = cfg.model.student.name_or_path, cfg.model.rm.name_or_path
    as_student, as_rm = [], []
    prefs = o.initial_prefs_path
    history, sequences = [], 0
    # Each round's game plays the next pools of the one prompt schedule: fresh prompts, as Algorithm 2 samples.
    pools_played = cfg.minmax.schedule_offset
    continues = []  # the previous round's game, whose optimiser and lr schedule this round's goes on with
    # The white-box refit is of a Q-function: its own step name, so experiments can tune it apart.
    fit = "train_q" if cfg.variant == Variant.white_box else "train_rm"
    for t in range(1, o.iterations + 1):
        it = f"iter{t}"
        collected = step(f"{it}/collect_prefs", "collect_prefs", [
            *as_student,
            f"collect_prefs.prompt_offset={cfg.collect_prefs.prompt_offset + (t - 1) * o.prompts_per_iteration}",
            f"collect_prefs.num_prompts={o.prompts_per_iteration}",
            f"collect_prefs.iteration={t}",
        ], overrides_key="online/collect_prefs")
        prefs = str(merge_preferences(prefs, collected["prefs_path"], run.dir / it / "prefs.jsonl"))
        # The refit starts from the latest RM (the previous game's), so it stays near what it learnt.
        fitted = step(f"{it}/{fit}", "train_rm", [
            *as_rm, f"train_rm.prefs_path={prefs}",
        ], overrides_key=f"online/{fit}")
        played = step(f"{it}/minmax", "minmax", [
            *as_student, *local_model("rm", fitted["model_dir"]), f"minmax.prefs_path={prefs}",
            f"minmax.schedule_offset={pools_played}", f"minmax.schedule_rounds={o.iterations}", *continues,
        ], overrides_key="online/minmax")
        pools_played += played["iterations"]
        continues = [f"minmax.continue_from={run.dir / it / 'minmax'}"]
        student, rm = played["model_dir"], played["rm_dir"]
        as_student, as_rm = local_model("student", student), local_model("rm", rm)
        sequences += played["student_train_sequences"]
        figures = {"iteration": t, "pairs": collected["pairs"],
                   "student_sample_accuracy": collected["student_sample_accuracy"],
                   "rm_heldout_accuracy": fitted.get("heldout_accuracy"), **played["final"]}
        history.append(figures)
        run.tracker.log({k: v for k, v in figures.items() if isinstance(v, (int, float))}, t, prefix="online/")
    return {"iterations": history, "model_dir": student, "rm_dir": rm, "prefs_path": prefs,
            "student_train_sequences": sequences}
