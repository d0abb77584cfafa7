"""White-box stages through the CLI on tiny models: KD divergences in `sft`, MM PbKD's Q pre-training
(`train-rm variant=white_box`), its game (`minmax variant=white_box`) and the white-box pipeline."""

from __future__ import annotations

import json

import pytest
import yaml

from .conftest import MINMAX, PREFS, TINY, ok, pbkd, summary


def metrics_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def prefs_file(prefs):
    return prefs / "prefs.jsonl"


@pytest.fixture(scope="module")
def q_function(workdir, trained_teacher, prefs_file):
    """Q pre-trained on the preferences, starting from the teacher's weights."""
    run_dir = workdir / "wb_q"
    ok(pbkd("train-rm", *TINY, "variant=white_box", f"train_rm.prefs_path={prefs_file}", "train_rm.heldout_fraction=0.25",
            f"model.teacher.name_or_path={trained_teacher}", f"model.rm.name_or_path={trained_teacher}",
            f"hydra.run.dir={run_dir}", cwd=workdir))
    return run_dir


def test_sft_distils_with_a_divergence_and_logs_both_terms(workdir, trained_teacher):
    run_dir = workdir / "kd_rkl"
    ok(pbkd("sft", *TINY, "sft.kd.loss=rkl", "sft.kd.ce_weight=0.5", "sft.kd.chunk_size=16",
            f"model.teacher.name_or_path={trained_teacher}", f"hydra.run.dir={run_dir}", cwd=workdir))
    assert summary(run_dir)["kd_loss"] == "rkl"
    last = metrics_of(run_dir)[-1]
    assert last["sft/rkl"] > 0 and last["sft/ce"] > 0 and last["sft/on_policy"] == 0.0
    assert last["sft/loss"] == pytest.approx(last["sft/rkl"] + 0.5 * last["sft/ce"], rel=1e-5)
    assert (run_dir / "model" / "model.safetensors").exists()


def test_sft_on_policy_mix_samples_from_the_student(workdir, trained_teacher):
    run_dir = workdir / "kd_gkd"
    ok(pbkd("sft", *TINY, "sft.kd.loss=jsd", "sft.kd.jsd_beta=0.3", "sft.kd.on_policy_ratio=1.0",
            f"model.teacher.name_or_path={trained_teacher}", f"hydra.run.dir={run_dir}", cwd=workdir))
    metrics = metrics_of(run_dir)
    # Every micro-batch trained on the student's own samples (the GKD mix at ratio 1).
    assert all(m["sft/on_policy"] == 1.0 for m in metrics)
    # JSD(beta) is bounded by H(beta) = -0.3 ln 0.3 - 0.7 ln 0.7 < 0.611.
    assert all(0 <= m["sft/jsd"] < 0.611 for m in metrics)


def test_teacher_runs_on_its_own_zero3_engine(workdir, trained_teacher):
    run_dir = workdir / "kd_zero3"
    ok(pbkd("sft", *TINY, "deepspeed=zero3", "sft.kd.loss=fkl", "trainer.max_steps=2",
            f"model.teacher.name_or_path={trained_teacher}", f"hydra.run.dir={run_dir}", cwd=workdir))
    assert metrics_of(run_dir)[-1]["sft/fkl"] > 0


@pytest.mark.parametrize("bad, key", [("sft.kd.on_policy_ratio=1.5", "sft.kd.on_policy_ratio=1.5"),
                                      ("sft.kd.on_policy_ratio=0.5", "sft.kd.on_policy_ratio")])
def test_bad_on_policy_ratio_is_one_line(workdir, bad, key):
    result = pbkd("sft", *TINY, bad, "hydra.run.dir=bad_ratio", cwd=workdir)
    assert result.returncode == 2 and key in result.stderr.strip().splitlines()[-1]
    assert not (workdir / "bad_ratio" / "model").exists()


def test_white_box_kd_rejects_a_teacher_with_another_vocabulary(workdir):
    other = workdir / "other_vocab_teacher"
    ok(pbkd("sft", *TINY, "sft.model=teacher", "tokenizer.vocab_size=280", "trainer.max_steps=1",
            f"hydra.run.dir={other}", cwd=workdir))
    result = pbkd("sft", *TINY, "sft.kd.loss=fkl", f"model.teacher.name_or_path={other / 'model'}",
                  "hydra.run.dir=bad_vocab", cwd=workdir)
    assert result.returncode == 2
    assert "model.teacher" in result.stderr.strip().splitlines()[-1] and "vocabulary" in result.stderr


def test_q_pretraining_saves_a_causal_lm_and_reports_heldout_accuracy(q_function):
    result = summary(q_function)
    assert result["heldout_pairs"] > 0 and 0.0 <= result["heldout_accuracy"] <= 1.0
    from transformers import AutoModelForCausalLM

    q = AutoModelForCausalLM.from_pretrained(q_function / "model")
    assert q.config.vocab_size >= 300


def test_mm_pbkd_plays_the_q_game(workdir, trained_teacher, prefs_file, q_function):
    run_dir = workdir / "mm_pbkd"
    ok(pbkd("minmax", *TINY, *MINMAX, "variant=white_box", "minmax.reward_l2=0.1",
            f"model.teacher.name_or_path={trained_teacher}", f"model.rm.name_or_path={q_function / 'model'}",
            f"minmax.prefs_path={prefs_file}", f"hydra.run.dir={run_dir}", cwd=workdir))
    metrics = metrics_of(run_dir)
    assert [m["step"] for m in metrics] == [1, 2]
    for key in ("minmax/q/moment_gap", "minmax/q/bt_loss", "minmax/q/moment_l2", "minmax/q/pref_accuracy",
                "minmax/pg/moment_matching", "minmax/pg/clip_fraction", "minmax/pg/kl", "minmax/reward/mean"):
        assert key in metrics[-1], key
    assert summary(run_dir)["variant"] == "white_box"
    assert (run_dir / "model" / "model.safetensors").exists() and (run_dir / "rm" / "model.safetensors").exists()


def test_white_box_pipeline_adds_fkl_rkl_and_mm_pbkd_rows(workdir):
    run_dir = workdir / "wb_pipeline"
    ok(pbkd("pipeline", *TINY, *PREFS, *MINMAX, "variant=white_box", "online.iterations=1",
            "online.prompts_per_iteration=8", "collect_prefs.samples_per_model=1", "pipeline.rm_init=teacher",
            "eval.limit=8", f"hydra.run.dir={run_dir}", cwd=workdir, timeout=600))
    methods = summary(run_dir)["methods"]
    # FKL and RKL train 4 steps x 4 sequences; each game 2 iterations x 4 prompts x 2 samples x 2 epochs.
    assert list(methods) == ["teacher", "base student", "vanilla KD", "vanilla KD + 16 seqs", "vanilla KD + 32 seqs",
                             "FKL", "RKL", "RL (verifiable reward)", "MM PbKD offline", "MM PbKD online"]
    assert summary(run_dir / "kd_fkl")["kd_loss"] == "fkl" and summary(run_dir / "kd_rkl")["kd_loss"] == "rkl"
    # The Q pre-training and refits are steps of their own, so an experiment tunes them apart from an RM's.
    assert (run_dir / "train_q" / "summary.json").exists()
    # The Q pre-training's implied reward reads the trained teacher's probabilities, not a fresh model's.
    q_config = yaml.safe_load((run_dir / "train_q" / "config.yaml").read_text())
    assert q_config["model"]["teacher"]["name_or_path"] == str(run_dir / "teacher" / "model")
    assert (run_dir / "pbkd_online" / "iter1" / "train_q" / "summary.json").exists()
    table = (run_dir / "comparison.md").read_text()
    assert "| MM PbKD online |" in table and "| RKL |" in table
