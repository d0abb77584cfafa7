"""Every method of the comparison, each step in its own subdirectory, ending with the table.

    [student_layers: the student = those decoder layers of model.student (DistilBERT's initialisation)]
    teacher (demo: fitted on gold) -> vanilla KD (SFT on teacher samples, to convergence)
      [white_box: -> FKL, RKL: white-box KD on the same teacher samples]
      [controls: -> RL with the verifiable reward (what a perfect RM could give)]
      -> offline preferences -> RM by MLE -> min-max              = PbKD offline
                  [controls, black-box: -> min-max with beta 0    = GAD]
      -> T x (collect with the current student, refit, min-max)   = PbKD online
      [baselines, black-box: -> teacher-vs-student pairs -> DPO    = DPKD
                             proxy: SFT on the teacher's answers -> teacher-vs-proxy pairs -> DPO
                             -> FKL from that proxy on the teacher's answers = Proxy-KD]
      -> for each extra budget above: vanilla KD trained on that many more teacher sequences
    -> exact-match evaluation of every model
Every method after vanilla KD starts from the vanilla-KD (SFT) student, as in the white-box KD
literature (MiniLLM, DistiLLM), so the table compares methods from one starting point; and each is
compared with vanilla KD given the same extra training (sequences the student is trained on), so
no gain is only more steps. With `variant=white_box` the RM is MM PbKD's Q-function, pre-trained on
the offline pairs (step `train_q`, a `train_rm` run).
"""

from __future__ import annotations

import math

from pbkd_cli.config.schema import ModelRole, PbkdConfig, Variant
from pbkd_cli.io import PbkdError, atomic_write_text
from pbkd_cli.models.roles import derive_student
from pbkd_cli.runner import Run, Steps, local_model


def comparison_table(methods: dict[str, dict]) -> str:
    lines = ["| method | accuracy | n | extra training (sequences) |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {m['accuracy']:.3f} | {m['n']} | {m.get('extra_sequences') or ''} |"
              for name, m in methods.items()]
    notes = [f"{name}: {m[key]:.3f} of the problems have a wrong greedy answer and a right one among "
             f"{key.partition('@')[2]} samples ({key}), the most that training it towards its own right samples can add"
             for name, m in methods.items() for key in m if key.startswith("headroom@")]
    return "\n".join(lines) + "\n" + "".join(f"\n{note}\n" for note in notes)


def extra_sequences(summary: dict) -> int:
    """The sequences a method trained the vanilla-KD student on (its budget beyond vanilla KD)."""
    return summary.get("student_train_sequences") or summary.get("train_sequences") or 0


def run(cfg: PbkdConfig, run: Run) -> dict:
    step = Steps(run)
    teacher_dir = cfg.model.teacher.name_or_path
    if cfg.pipeline.train_teacher:
        teacher_dir = step("teacher", "sft", ["sft.model=teacher", "sft.source=gold"])["model_dir"]
    # A trained teacher is a saved model; a configured one (pipeline.train_teacher=false) stays as given.
    teacher = local_model("teacher", teacher_dir) if cfg.pipeline.train_teacher else []
    base_student = []
    if cfg.pipeline.student_layers:
        derived = derive_student(cfg, run.dir / "student_init" / "model")
        base_student = local_model("student", derived)
    vanilla = step("vanilla_kd", "sft", [*teacher, *base_student, "sft.model=student", "sft.source=teacher"])
    sft_student = local_model("student", vanilla["model_dir"])
    # Every later SFT on the teacher's answers reads vanilla KD's back instead of asking the teacher again.
    teacher_answers = run.dir / "vanilla_kd" / "teacher_responses.jsonl"
    on_answers = ["sft.source=teacher", f"sft.teacher_answers_path={teacher_answers}"]
    vanilla_kd = [*teacher, "sft.model=student", *on_answers]
    # The games compare the student with (and may imitate) the teacher's answers that vanilla KD was
    # trained on: read them back rather than have the teacher answer again in every game.
    c, s = cfg.minmax, cfg.sft
    same_answers = (c.teacher_samples_per_prompt, c.teacher_temperature) == (s.teacher_samples_per_prompt,
                                                                              s.teacher_temperature)
    answers = [f"minmax.teacher_answers_path={teacher_answers}"] if same_answers else []
    white_box = cfg.variant == Variant.white_box
    trained = {}  # method -> summary of the run that trained it from the vanilla-KD student
    if white_box:
        for loss in ("fkl", "rkl"):
            trained[loss.upper()] = step(f"kd_{loss}", "sft", [*vanilla_kd, *sft_student, f"sft.kd.loss={loss}"])
    if cfg.pipeline.controls:
        trained["RL (verifiable reward)"] = step("rl_correctness", "minmax", [
            *teacher, *sft_student, *answers, "minmax.reward=correctness"])

    offline_prefs = step("offline_prefs", "collect_prefs", [*teacher, *sft_student])
    backbone = {ModelRole.teacher: teacher_dir, ModelRole.student: vanilla["model_dir"]}.get(cfg.pipeline.rm_init)
    if cfg.pipeline.rm_init is not None and backbone is None:
        raise PbkdError("pipeline.rm_init=teacher: the teacher has no local weights to start the RM from")
    fit = "train_q" if white_box else "train_rm"
    # The Q-function's implied reward reads the teacher's probabilities: it needs the trained teacher.
    rm = step(fit, "train_rm", [*teacher, f"train_rm.prefs_path={offline_prefs['prefs_path']}",
                                *(local_model("rm", backbone) if backbone else [])])
    # MM PbKD's student step matches moments on every prompt it samples, on its own samples only: on the
    # demo the black-box game's group settings cost it another point (README, MM PbKD controls).
    own_samples = ["minmax.oversample=1", "minmax.teacher_in_group=false", "minmax.rollouts_per_update=null",
                   "minmax.distrusted_fraction=0"]
    game = [*teacher, *sft_student, *answers, *(own_samples if white_box else []),
            *local_model("rm", rm["model_dir"]), f"minmax.prefs_path={offline_prefs['prefs_path']}"]
    pbkd = "MM PbKD" if white_box else "PbKD"
    if cfg.pipeline.controls and not white_box:
        # GAD: the same game with no preference anchor; the RM is a teacher-vs-student discriminator.
        trained["GAD"] = step("gad", "minmax", [*game, "minmax.beta=0"])
    trained[f"{pbkd} offline"] = step("pbkd_offline", "minmax", game)
    trained[f"{pbkd} online"] = step("pbkd_online", "online", [
        *teacher, *sft_student, *answers, *(own_samples if white_box else []), *local_model("rm", rm["model_dir"]),
        f"online.initial_prefs_path={offline_prefs['prefs_path']}",
        # Online rounds ask fresh prompts, after the ones the offline pairs used.
        f"collect_prefs.prompt_offset={offline_prefs['prompts']}"])

    if cfg.pipeline.baselines and not white_box:
        # DPKD: the vanilla-KD student's implicit reward log(pi / pi_SFT), raised on the teacher's answer
        # over its own (DPO). Its first stage (implicit reward + reverse KL) needs the teacher's
        # probabilities; in the black-box pipeline the vanilla-KD student stands in for it.
        dpkd_prefs = step("dpkd_prefs", "collect_prefs", [*teacher, *sft_student,
                                                          "collect_prefs.labeler=teacher_preferred"])
        dpkd = trained["DPKD"] = step("dpkd", "dpo", [*sft_student, f"dpo.prefs_path={dpkd_prefs['prefs_path']}"])
        # Proxy-KD: a white-box proxy (`model.proxy`, of the teacher's family) aligned to the teacher by SFT
        # on its answers, then by DPO with the teacher's answers preferred over the proxy's own; then the
        # student learns the teacher's answers with the proxy's token probabilities as targets (FKL).
        proxy_sft = step("proxy_sft", "sft", ["sft.model=proxy", *on_answers])
        proxy_prefs = step("proxy_prefs", "collect_prefs", [
            *teacher, *local_model("student", proxy_sft["model_dir"]), "collect_prefs.labeler=teacher_preferred"])
        proxy = step("proxy_dpo", "dpo", [*local_model("student", proxy_sft["model_dir"]),
                                          f"dpo.prefs_path={proxy_prefs['prefs_path']}"])
        trained["Proxy-KD"] = step("proxy_kd", "sft", [
            "sft.model=student", *on_answers, *local_model("teacher", proxy["model_dir"]), *sft_student,
            "sft.kd.loss=fkl"])

    # Compute-matched baselines: vanilla KD continued on teacher samples, one per budget used above.
    matched = {}
    for budget in sorted({extra_sequences(s) for s in trained.values()} - {0}):
        steps = math.ceil(budget / cfg.trainer.micro_batch_size)
        matched[f"vanilla KD + {budget} seqs"] = step(
            f"vanilla_kd_plus_{budget}", "sft", [*vanilla_kd, *sft_student, f"trainer.max_steps={steps}"],
            overrides_key="vanilla_kd_budget")

    students = {"base student": None, "vanilla KD": vanilla, **matched, **trained}
    methods = {}
    for name, trained_run in {"teacher": None, **students}.items():
        role = "teacher" if name == "teacher" else "student"
        model = local_model("student", trained_run["model_dir"]) if trained_run else base_student
        step_name = f"eval/{name.replace(' ', '_').replace('(', '').replace(')', '').replace('+_', 'plus_')}"
        k = cfg.pipeline.headroom_samples if name == "vanilla KD" else 0
        sampled = [f"eval.num_samples={k}", f"eval.temperature={cfg.minmax.temperature}"] if k else []
        result = step(step_name, "eval", [*teacher, *model, f"eval.model={role}", *sampled])
        methods[name] = {"accuracy": result["accuracy"], "n": result["n"], "run_dir": str(run.dir / step_name),
                         "extra_sequences": extra_sequences(trained_run) if name != "vanilla KD" and trained_run
                         else 0,
                         # vanilla KD's, with pipeline.headroom_samples.
                         **{key: v for key, v in result.items() if key.startswith(("pass@", "headroom@"))}}
    table = comparison_table(methods)
    atomic_write_text(run.dir / "comparison.md", table)
    print(f"\nAccuracy on the {cfg.eval.split} split ({run.dir}):\n\n{table}", flush=True)
    return {"variant": cfg.variant.value, "methods": methods, "rm_heldout_accuracy": rm.get("heldout_accuracy")}
