"""The CLI surface and the `sft` / `eval` / `pipeline` stages, end to end on tiny models."""

from __future__ import annotations

import json

import yaml
from omegaconf import OmegaConf

from .conftest import MINMAX, PREFS, TINY, ok, pbkd, summary


def test_pipeline_with_the_paper_baselines_trains_dpkd_and_proxy_kd(workdir):
    run_dir = workdir / "pipeline_baselines"
    # The student is derived from a 3-layer model.student by keeping its layers 0 and 2.
    ok(pbkd("pipeline", *TINY, *PREFS, *MINMAX, "online.iterations=1", "online.prompts_per_iteration=8",
            "pipeline.controls=false", "pipeline.baselines=true", "model.student.tiny.num_hidden_layers=3",
            "pipeline.student_layers=[0,2]", f"hydra.run.dir={run_dir}", cwd=workdir))
    derived = run_dir / "student_init" / "model"
    assert json.loads((derived / "config.json").read_text())["num_hidden_layers"] == 2
    for step in ("vanilla_kd", "eval/base_student"):
        assert OmegaConf.load(run_dir / step / "config.yaml").model.student.name_or_path == str(derived), step
    assert json.loads((run_dir / "vanilla_kd" / "model" / "config.json").read_text())["num_hidden_layers"] == 2
    methods = summary(run_dir)["methods"]
    # DPO trains on both responses of 4 steps x 4 pairs (32 sequences, the games' budget), Proxy-KD's FKL
    # on 4 x 4 answers: each gets its compute-matched vanilla-KD row.
    assert list(methods) == ["teacher", "base student", "vanilla KD", "vanilla KD + 16 seqs", "vanilla KD + 32 seqs",
                             "PbKD offline", "PbKD online", "DPKD", "Proxy-KD"]
    assert methods["DPKD"]["extra_sequences"] == 32 and methods["Proxy-KD"]["extra_sequences"] == 16
    assert OmegaConf.load(run_dir / "dpkd_prefs" / "config.yaml").collect_prefs.labeler == "teacher_preferred"
    dpkd = OmegaConf.load(run_dir / "dpkd" / "config.yaml")
    assert dpkd.dpo.prefs_path == summary(run_dir / "dpkd_prefs")["prefs_path"]
    assert dpkd.model.student.name_or_path == str(run_dir / "vanilla_kd" / "model")
    # Proxy-KD: its own proxy (model.proxy), SFT on the teacher's answers, DPO on teacher-over-proxy
    # pairs, then FKL from it into the vanilla-KD student on the same teacher answers.
    answers = str(run_dir / "vanilla_kd" / "teacher_responses.jsonl")
    proxy_sft = OmegaConf.load(run_dir / "proxy_sft" / "config.yaml")
    assert proxy_sft.sft.model == "proxy" and proxy_sft.sft.teacher_answers_path == answers
    assert summary(run_dir / "proxy_sft")["train_pairs"] == summary(run_dir / "vanilla_kd")["train_pairs"]
    proxy_prefs = OmegaConf.load(run_dir / "proxy_prefs" / "config.yaml")
    assert proxy_prefs.model.student.name_or_path == str(run_dir / "proxy_sft" / "model")
    assert proxy_prefs.collect_prefs.labeler == "teacher_preferred"
    assert OmegaConf.load(run_dir / "proxy_dpo" / "config.yaml").model.student.name_or_path == str(
        run_dir / "proxy_sft" / "model")
    proxy = OmegaConf.load(run_dir / "proxy_kd" / "config.yaml")
    assert proxy.model.teacher.name_or_path == str(run_dir / "proxy_dpo" / "model") and proxy.sft.kd.loss == "fkl"
    assert proxy.model.student.name_or_path == str(run_dir / "vanilla_kd" / "model")
    assert proxy.sft.teacher_answers_path == answers
    # The compute-matched rows read the same answers instead of asking the teacher again.
    assert OmegaConf.load(run_dir / "vanilla_kd_plus_16" / "config.yaml").sft.teacher_answers_path == answers


def test_a_run_directory_that_is_a_file_is_one_line_before_anything_loads(workdir):
    (workdir / "not_a_dir").write_text("x")
    result = pbkd("eval", *TINY, "hydra.run.dir=not_a_dir", cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: hydra.run.dir=not_a_dir: is a file, not a directory"
    assert (workdir / "not_a_dir").read_text() == "x"


def test_version_names_pbkd_its_commit_and_its_libraries(workdir):
    out = ok(pbkd("--version", cwd=workdir)).stdout.splitlines()
    assert out[0].startswith("pbkd 0.1.0 (git ") and "torch " in out[1] and "deepspeed " in out[1]


def test_help_lists_every_stage(workdir):
    out = ok(pbkd("--help", cwd=workdir)).stdout
    for stage in ("sft", "collect-prefs", "train-rm", "dpo", "minmax", "online", "eval", "pipeline"):
        assert stage in out


def test_stage_help_shows_config_groups(workdir):
    out = ok(pbkd("sft", "--help", cwd=workdir)).stdout
    assert "model/student" in out and "deepspeed" in out and "zero3" in out and "exp" in out


def test_cfg_job_prints_the_composed_config_without_running(workdir):
    result = ok(pbkd("sft", "+exp=demo", "trainer.lr=0.0123", "--cfg", "job", cwd=workdir))
    cfg = yaml.safe_load(result.stdout)
    assert cfg["trainer"]["lr"] == 0.0123 and cfg["stage"] == "sft"
    assert not (workdir / "outputs").exists()


def test_bad_value_fails_with_one_line_naming_the_key(workdir):
    result = pbkd("sft", "+exp=demo", "trainer.lr=oops", cwd=workdir)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "trainer.lr" in lines[0] and "oops" in lines[0]


def test_unknown_key_fails_with_one_line_naming_the_key(workdir):
    for override in ("no_such_key=1", "+no_such_key=1", "trainer.no_such_key=1"):
        result = pbkd("sft", "+exp=demo", override, cwd=workdir)
        assert result.returncode == 2, override
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "no_such_key" in lines[0], (override, result.stderr)


def test_bad_choice_and_sweep_without_multirun_are_rejected(workdir):
    result = pbkd("sft", "sft.source=oracle", cwd=workdir)
    assert result.returncode == 2 and "sft.source" in result.stderr
    result = pbkd("sft", "seed=1,2", cwd=workdir)
    assert result.returncode == 2 and "--multirun" in result.stderr


def test_missing_model_path_is_one_line(workdir):
    result = pbkd("eval", *TINY, "model.student.name_or_path=/no/such/model", "hydra.run.dir=bad", cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: model.student.name_or_path=/no/such/model")



def test_sft_writes_a_complete_run_directory(trained_teacher):
    run_dir = trained_teacher.parent
    assert (trained_teacher / "model.safetensors").exists()
    assert (trained_teacher / "tokenizer.json").exists() and (trained_teacher / "config.json").exists()
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["sft"]["model"] == "teacher" and cfg["trainer"]["max_steps"] == 6
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["seed"] == 0 and info["packages"]["torch"] and "commit" in info["git"]
    assert "sft.model=teacher" in info["overrides"]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4, 6] and all("sft/loss" in m for m in metrics)
    result = summary(run_dir)
    assert result["steps"] == 6 and result["train_pairs"] == 96 and result["final_train_loss"] > 0
    assert not list(run_dir.glob(".*.tmp"))


def test_eval_scores_a_trained_model(workdir, trained_teacher):
    run_dir = workdir / "eval_teacher"
    ok(pbkd("eval", *TINY, "eval.model=teacher", f"model.teacher.name_or_path={trained_teacher}",
            "eval.num_samples=2", f"hydra.run.dir={run_dir}", cwd=workdir))
    result = summary(run_dir)
    assert result["n"] == 16 and 0.0 <= result["accuracy"] <= 1.0 and "maj@2" in result
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(len(r["samples"]) == 2 for r in rows)
    assert result["accuracy"] == sum(r["correct"] for r in rows) / 16
    assert result["pass@2"] == sum(r["sampled_correct"] > 0 for r in rows) / 16
    assert result["headroom@2"] == sum(r["sampled_correct"] > 0 and not r["correct"] for r in rows) / 16


def test_vanilla_kd_trains_the_student_on_teacher_samples(workdir, trained_teacher):
    run_dir = workdir / "vanilla"
    ok(pbkd("sft", *TINY, "sft.source=teacher", f"model.teacher.name_or_path={trained_teacher}",
            f"hydra.run.dir={run_dir}", cwd=workdir))
    rows = [json.loads(line) for line in (run_dir / "teacher_responses.jsonl").read_text().splitlines()]
    assert len(rows) == 96 and summary(run_dir)["source"] == "teacher"
    assert (run_dir / "model" / "model.safetensors").exists()

    # The same answers read back (no teacher loaded: none is configured) train the same student.
    answers = run_dir / "teacher_responses.jsonl"
    reread = workdir / "vanilla_reread"
    ok(pbkd("sft", *TINY, "sft.source=teacher", f"sft.teacher_answers_path={answers}", f"hydra.run.dir={reread}",
            cwd=workdir))
    assert summary(reread)["final_train_loss"] == summary(run_dir)["final_train_loss"]
    assert not (reread / "teacher_responses.jsonl").exists()
    short = workdir / "short_answers.jsonl"
    short.write_text("\n".join(answers.read_text().splitlines()[1:]) + "\n")
    result = pbkd("sft", *TINY, "sft.source=teacher", f"sft.teacher_answers_path={short}", "hydra.run.dir=bad_answers",
                  cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: sft.teacher_answers_path={short}: 0 answers for prompt")


def test_same_config_and_seed_reproduce_the_summary(workdir):
    runs = [workdir / "repro_a", workdir / "repro_b"]
    for run_dir in runs:
        ok(pbkd("sft", *TINY, "seed=3", f"hydra.run.dir={run_dir}", cwd=workdir))
    assert summary(runs[0]) | {"model_dir": None} == summary(runs[1]) | {"model_dir": None}


def test_multirun_gives_one_directory_per_job(workdir):
    sweep = workdir / "sweep"
    ok(pbkd("sft", "-m", *TINY, "seed=1,2", f"hydra.sweep.dir={sweep}", cwd=workdir))
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    seeds = [yaml.safe_load((p / "config.yaml").read_text())["seed"] for p in jobs]
    assert seeds == [1, 2]
    assert summary(jobs[0])["final_train_loss"] != summary(jobs[1])["final_train_loss"]


def test_pipeline_prints_and_saves_the_table(workdir):
    run_dir = workdir / "pipeline"
    args = ["pipeline", *TINY, *PREFS, *MINMAX, "online.iterations=1", "online.prompts_per_iteration=8",
            "pipeline.headroom_samples=3", f"hydra.run.dir={run_dir}"]
    result = ok(pbkd(*args, cwd=workdir))
    methods = summary(run_dir)["methods"]
    # Every game here trains on 2 iterations x 4 prompts x 2 samples x 2 epochs = 32 sequences (online: 1 round
    # of the same game), so one compute-matched vanilla-KD row covers them all.
    assert list(methods) == ["teacher", "base student", "vanilla KD", "vanilla KD + 32 seqs", "RL (verifiable reward)",
                             "GAD", "PbKD offline", "PbKD online"]
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in methods.values())
    # Only vanilla KD is sampled: its headroom is read off its own predictions.
    predictions = (run_dir / "eval" / "vanilla_KD" / "predictions.jsonl").read_text()
    rows = [json.loads(line) for line in predictions.splitlines()]
    assert methods["vanilla KD"]["headroom@3"] == sum(r["sampled_correct"] > 0 and not r["correct"] for r in rows) / 16
    assert [name for name, m in methods.items() if "headroom@3" in m] == ["vanilla KD"]
    assert "headroom@3" in result.stdout
    assert methods["vanilla KD + 32 seqs"]["extra_sequences"] == methods["PbKD offline"]["extra_sequences"] == 32
    matched = summary(run_dir / "vanilla_kd_plus_32")
    assert matched["train_sequences"] == 32 and matched["steps"] == 32 // 4
    assert summary(run_dir / "rl_correctness")["reward"] == "correctness"
    # The games read the teacher's answers vanilla KD was trained on instead of sampling the teacher again.
    for game in ("rl_correctness", "gad", "pbkd_offline", "pbkd_online/iter1/minmax"):
        played = OmegaConf.load(run_dir / game / "config.yaml")
        assert played.minmax.teacher_answers_path == str(run_dir / "vanilla_kd" / "teacher_responses.jsonl"), game
    assert "| vanilla KD |" in result.stdout and (run_dir / "comparison.md").exists()
    # A rerun resumes: every step is already done, and the table is the same.
    again = ok(pbkd(*args, cwd=workdir))
    assert summary(run_dir)["methods"] == methods and "already done" in again.stderr + again.stdout
