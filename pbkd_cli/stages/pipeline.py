"""Every method of the comparison, each step in its own subdirectory, ending with the table.

    teacher (demo: fitted on gold) -> vanilla KD (SFT on teacher samples)
      [white_box: -> FKL, RKL: white-box KD on the same teacher samples]
      -> offline preferences -> RM by MLE -> min-max              = PbKD offline
      -> T x (collect with the current student, refit, min-max)   = PbKD online
    -> exact-match evaluation of every model
Every method after vanilla KD starts from the vanilla-KD (SFT) student, as in the white-box KD
literature (MiniLLM, DistiLLM), so the table compares methods from one starting point. With
`variant=white_box` the RM is MM PbKD's Q-function, pre-trained on the offline pairs
(step `train_q`, a `train_rm` run).
"""

from __future__ import annotations

from pbkd_cli.config.schema import ModelRole, PbkdConfig, Variant
from pbkd_cli.io import PbkdError, atomic_write_text
from pbkd_cli.runner import Run
from pbkd_cli.stages._steps import Steps


def comparison_table(methods: dict[str, dict]) -> str:
    lines = ["| method | accuracy | n |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {m['accuracy']:.3f} | {m['n']} |" for name, m in methods.items()]
    return "\n".join(lines) + "\n"


def run(cfg: PbkdConfig, run: Run) -> dict:
    step = Steps(run)
    teacher_dir = cfg.model.teacher.name_or_path
    if cfg.pipeline.train_teacher:
        teacher_dir = step("teacher", "sft", ["sft.model=teacher", "sft.source=gold"])["model_dir"]
    teacher = [f"model.teacher.name_or_path={teacher_dir}"] if teacher_dir else []
    vanilla = step("vanilla_kd", "sft", [*teacher, "sft.model=student", "sft.source=teacher"])
    sft_student = f"model.student.name_or_path={vanilla['model_dir']}"
    white_box = {}
    if cfg.variant == Variant.white_box:
        for loss in ("fkl", "rkl"):
            white_box[loss.upper()] = step(f"kd_{loss}", "sft", [*teacher, sft_student, "sft.model=student",
                                                                 "sft.source=teacher", f"sft.kd.loss={loss}"])

    offline_prefs = step("offline_prefs", "collect_prefs", [*teacher, sft_student])
    backbone = {ModelRole.teacher: teacher_dir, ModelRole.student: vanilla["model_dir"]}.get(cfg.pipeline.rm_init)
    if cfg.pipeline.rm_init is not None and backbone is None:
        raise PbkdError("pipeline.rm_init=teacher: the teacher has no local weights to start the RM from")
    fit = "train_q" if cfg.variant == Variant.white_box else "train_rm"
    rm = step(fit, "train_rm", [f"train_rm.prefs_path={offline_prefs['prefs_path']}",
                                       *([f"model.rm.name_or_path={backbone}"] if backbone else [])])
    offline = step("pbkd_offline", "minmax", [
        *teacher, sft_student, f"model.rm.name_or_path={rm['model_dir']}",
        f"minmax.prefs_path={offline_prefs['prefs_path']}"])
    online = step("pbkd_online", "online", [
        *teacher, sft_student, f"model.rm.name_or_path={rm['model_dir']}",
        f"online.initial_prefs_path={offline_prefs['prefs_path']}",
        # Online rounds ask fresh prompts, after the ones the offline pairs used.
        f"collect_prefs.prompt_offset={offline_prefs['prompts']}"])

    pbkd = "MM PbKD" if cfg.variant == Variant.white_box else "PbKD"
    students = {"base student": None, "vanilla KD": vanilla, **white_box, f"{pbkd} offline": offline,
                f"{pbkd} online": online}
    methods = {}
    for name, trained_run in {"teacher": None, **students}.items():
        role = "teacher" if name == "teacher" else "student"
        model = [f"model.student.name_or_path={trained_run['model_dir']}"] if trained_run else []
        step_name = f"eval/{name.replace(' ', '_')}"
        result = step(step_name, "eval", [*teacher, *model, f"eval.model={role}"])
        methods[name] = {"accuracy": result["accuracy"], "n": result["n"], "run_dir": str(run.dir / step_name)}
    table = comparison_table(methods)
    atomic_write_text(run.dir / "comparison.md", table)
    print(f"\nAccuracy on the {cfg.eval.split} split ({run.dir}):\n\n{table}", flush=True)
    return {"variant": cfg.variant.value, "methods": methods, "rm_heldout_accuracy": rm.get("heldout_accuracy")}
