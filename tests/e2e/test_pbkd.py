"""Black-box PbKD stages through the CLI on tiny models: collect-prefs, train-rm, minmax, online."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from pbkd_cli.data.preferences import load_preferences
from pbkd_cli.engine.deepspeed_engine import lr_multiplier

from .conftest import MINMAX, PREFS, TINY, ok, pbkd, summary


def test_collect_prefs_writes_teacher_preferred_pairs(prefs):
    pairs = load_preferences(prefs / "prefs.jsonl")
    assert len(pairs) == 24 * 2 == summary(prefs)["pairs"]
    assert all(p.chosen_source == "teacher" and p.rejected_source == "student" for p in pairs)
    assert len({p.id for p in pairs}) == len(pairs)
    assert not (prefs / "prefs.partial.jsonl").exists() and not (prefs / "prefs.commit.json").exists()


def test_collect_prefs_killed_midway_resumes_without_loss_or_duplicates(workdir, trained_teacher, prefs):
    run_dir = workdir / "prefs_killed"
    args = ["collect-prefs", *TINY, *PREFS, "collect_prefs.chunk_prompts=2",
            f"model.teacher.name_or_path={trained_teacher}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "pbkd_cli.cli", *args], cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    commit = run_dir / "prefs.commit.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (commit.exists() and json.loads(commit.read_text())["prompts_done"] >= 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(commit.read_text())["prompts_done"]
    assert 4 <= done < 24, "the kill must land midway"
    assert not (run_dir / "prefs.jsonl").exists(), "no final file until every prompt is done"
    ok(pbkd(*args, cwd=workdir))
    resumed = [(p.id, p.chosen, p.rejected) for p in load_preferences(run_dir / "prefs.jsonl")]
    # Chunks are seeded by position, so the resumed file equals an uninterrupted run's with the same chunking.
    clean_dir = workdir / "prefs_clean"
    ok(pbkd(*args[:-1], f"hydra.run.dir={clean_dir}", cwd=workdir))
    clean = [(p.id, p.chosen, p.rejected) for p in load_preferences(clean_dir / "prefs.jsonl")]
    assert resumed == clean and len({r[0] for r in resumed}) == len(resumed) == 48


def test_collect_prefs_correctness_labeler(workdir, trained_teacher):
    run_dir = workdir / "prefs_correct"
    ok(pbkd("collect-prefs", *TINY, *PREFS, "collect_prefs.labeler=correctness", "collect_prefs.format=parquet",
            f"model.teacher.name_or_path={trained_teacher}", f"hydra.run.dir={run_dir}", cwd=workdir))
    result = summary(run_dir)
    assert result["labeler"] == "correctness" and result["prefs_path"].endswith(".parquet")
    from datasets import load_dataset

    rows = load_dataset("parquet", data_files=result["prefs_path"], split="train")
    assert len(rows) == result["pairs"]
    from pbkd_cli.data.gsm8k import extract_answer

    assert all(extract_answer(r["chosen"]) == r["answer"] != extract_answer(r["rejected"]) for r in rows)


def test_train_rm_reports_heldout_accuracy_and_saves_a_sequence_classifier(reward_model):
    result = summary(reward_model)
    assert result["train_pairs"] + result["heldout_pairs"] == 48 and result["heldout_pairs"] == 12
    assert 0.0 <= result["heldout_accuracy"] <= 1.0 and result["mle_loss"] > 0
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(reward_model / "model")
    # Read at the last token by default: the pooling transformers itself applies to this checkpoint.
    assert rm.config.num_labels == 1 and rm.config.reward_pooling == "last"


def test_train_rm_with_likelihood_pooling_saves_a_causal_lm_that_ranks_the_pairs(workdir, trained_teacher, prefs):
    run_dir = workdir / "rm_likelihood"
    ok(pbkd("train-rm", *TINY, f"train_rm.prefs_path={prefs / 'prefs.jsonl'}", "train_rm.pooling=likelihood",
            "train_rm.likelihood_scale=30", f"model.rm.name_or_path={trained_teacher}", "trainer.lr=1e-3",
            f"hydra.run.dir={run_dir}", cwd=workdir))
    result = summary(run_dir)
    # The pairs prefer the teacher's answers and the RM's LM head starts as the teacher's: it ranks them
    # better than chance from the start, and the Bradley-Terry fit, read at 30 times the mean
    # log-probability, ranks more of them right than it started with (at lr 0 the two are equal: below).
    assert result["mle_loss"] < 0.693 and result["train_accuracy"] > 0.5
    assert result["train_accuracy"] > result["train_accuracy_at_start"] > 0.5
    from transformers import AutoModelForCausalLM

    rm = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert rm.config.reward_pooling == "likelihood" and rm.config.reward_scale == 30.0


def test_train_rm_at_lr_0_ends_where_it_started(workdir, trained_teacher, prefs):
    run_dir = workdir / "rm_lr0"
    ok(pbkd("train-rm", *TINY, f"train_rm.prefs_path={prefs / 'prefs.jsonl'}", "train_rm.pooling=likelihood",
            f"model.rm.name_or_path={trained_teacher}", "trainer.lr=0", "trainer.max_steps=2",
            f"hydra.run.dir={run_dir}", cwd=workdir))
    result = summary(run_dir)
    assert result["train_accuracy"] == result["train_accuracy_at_start"] > 0.5
    assert result["heldout_accuracy"] == result["heldout_accuracy_at_start"]


def test_dpo_moves_the_policy_towards_the_chosen_answers(workdir, prefs):
    run_dir = workdir / "dpo"
    ok(pbkd("dpo", *TINY, f"dpo.prefs_path={prefs / 'prefs.jsonl'}", "dpo.beta=0.5", "trainer.max_steps=12",
            "trainer.micro_batch_size=8", "trainer.lr=3e-3", "trainer.log_every=1", f"hydra.run.dir={run_dir}",
            cwd=workdir))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Step 1 scores the policy as it starts, which is the reference: margin 0, loss log 2.
    assert abs(metrics[0]["dpo/loss"] - 0.693147) < 1e-3 and metrics[0]["dpo/reward_margin"] == 0.0
    assert metrics[-1]["dpo/loss"] < 0.5 and metrics[-1]["dpo/reward_margin"] > 0.5
    result = summary(run_dir)
    assert result["train_pairs"] + result["heldout_pairs"] == 48 and result["train_sequences"] == 2 * 12 * 8
    pairs = load_preferences(prefs / "prefs.jsonl")
    assert 0 <= result["identical_pairs"] <= sum(p.chosen == p.rejected for p in pairs)
    # The teacher's answers differ from the untrained student's in ways a held-out pair shares.
    assert result["heldout_reward_accuracy"] > 0.5
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run_dir / "model")


def test_minmax_plays_the_game_and_logs_its_figures(workdir, trained_teacher, prefs, reward_model):
    run_dir = workdir / "minmax"
    ok(pbkd("minmax", *TINY, *MINMAX, f"model.teacher.name_or_path={trained_teacher}",
            f"model.rm.name_or_path={reward_model / 'model'}", f"minmax.prefs_path={prefs / 'prefs.jsonl'}",
            "minmax.eval_every=2", "minmax.eval_prompts=8", "minmax.oversample=2", "minmax.teacher_in_group=true",
            "minmax.distrusted_fraction=0.5", f"hydra.run.dir={run_dir}",
            cwd=workdir))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    # Held-out greedy accuracy on the first 8 test problems, before the first step and at iteration 2.
    start, metrics = metrics[0], metrics[1:]
    assert set(start) == {"step", "minmax/heldout_accuracy"} and "minmax/heldout_accuracy" not in metrics[0]
    assert 0.0 <= metrics[1]["minmax/heldout_accuracy"] <= 1.0
    result = summary(run_dir)
    assert result["heldout_accuracy_at_start"] == start["minmax/heldout_accuracy"]
    assert result["final"]["heldout_accuracy"] == metrics[1]["minmax/heldout_accuracy"]
    # 2 iterations x 4 prompts x (2 samples + the teacher's answer), 2 PPO epochs of one optimiser step
    # each; 8 prompts sampled per iteration (oversample 2), the 4 the RM tells apart most trained on.
    assert result["student_train_sequences"] == 48 and result["student_updates"] == 4
    assert result["student_samples"] == 32
    for key in ("minmax/sample/pool_accuracy", "minmax/sample/informative_prompts", "minmax/rm/gap", "minmax/rm/bt_loss", "minmax/rm/pref_accuracy", "minmax/pg/clip_fraction",
                "minmax/pg/kl", "minmax/reward/mean", "minmax/reward/std", "minmax/sample/length",
                "minmax/reward/teacher_minus_student", "minmax/pg/positive_on_wrong"):
        assert key in metrics[-1], key
    assert (run_dir / "model" / "model.safetensors").exists() and (run_dir / "rm" / "model.safetensors").exists()


def test_minmax_rejects_batch_arithmetic_that_does_not_fit(workdir, prefs, reward_model):
    result = pbkd("minmax", *TINY, *MINMAX, "trainer.micro_batch_size=3",
                  f"minmax.prefs_path={prefs / 'prefs.jsonl'}", "hydra.run.dir=bad_minmax", cwd=workdir)
    assert result.returncode == 2 and "trainer.micro_batch_size=3" in result.stderr.strip().splitlines()[-1]


def test_online_runs_iterations_with_their_own_directories(workdir, trained_teacher, reward_model):
    run_dir = workdir / "online"
    args = ["online", *TINY, *MINMAX, "online.iterations=2", "online.prompts_per_iteration=8",
            "collect_prefs.samples_per_model=1", "collect_prefs.chunk_prompts=8",
            f"model.teacher.name_or_path={trained_teacher}", f"model.rm.name_or_path={reward_model / 'model'}",
            f"hydra.run.dir={run_dir}"]
    ok(pbkd(*args, cwd=workdir))
    result = summary(run_dir)
    assert [it["iteration"] for it in result["iterations"]] == [1, 2]
    for t in (1, 2):
        for step in ("collect_prefs", "train_rm", "minmax"):
            assert (run_dir / f"iter{t}" / step / "summary.json").exists()
    # Round 2's game plays the pools after round 1's (fresh prompts), not round 1's again.
    played = [OmegaConf.load(run_dir / f"iter{t}" / "minmax" / "config.yaml").minmax for t in (1, 2)]
    assert [p.schedule_offset for p in played] == [0, played[0].iterations]
    # ... and goes on with round 1's optimiser and lr schedule: the rounds' learning rates are those of
    # one schedule over both (a round that warmed up afresh would start round 2 at the warm-up's first lr).
    trainer = OmegaConf.load(run_dir / "iter1" / "minmax" / "config.yaml").trainer
    rounds = [summary(run_dir / f"iter{t}" / "minmax") for t in (1, 2)]
    per_iteration, total = rounds[0]["student_updates"] // 2, sum(r["student_updates"] for r in rounds)
    lrs = [row["minmax/pg/lr"] for t in (1, 2) for row in map(json.loads, (
        run_dir / f"iter{t}" / "minmax" / "metrics.jsonl").read_text().splitlines()) if "minmax/pg/lr" in row]
    one_schedule = [trainer.lr * lr_multiplier(i * per_iteration, trainer.lr_schedule, int(trainer.warmup_ratio * total),
                                               total) for i in range(4)]
    assert lrs == pytest.approx(one_schedule) and lrs[2] < lrs[1]
    assert "student_state_dir" in rounds[0] and "student_state_dir" not in rounds[1]
    # D^2 = D^1 + the second round's pairs.
    assert len(load_preferences(run_dir / "iter2" / "prefs.jsonl")) == 2 * len(load_preferences(run_dir / "iter1" / "prefs.jsonl"))
    # Resumable at iteration granularity: drop the last step and rerun.
    import shutil

    shutil.rmtree(run_dir / "iter2" / "minmax")
    again = ok(pbkd(*args, cwd=workdir))
    assert "already done" in again.stderr + again.stdout
    assert summary(run_dir)["iterations"][0] == result["iterations"][0]


def test_lora_students_and_rms_train_through_sft_dpo_train_rm_and_the_game(workdir, trained_teacher, prefs, reward_model):
    from transformers import AutoModelForCausalLM

    sft_dir = workdir / "sft_lora"
    ok(pbkd("sft", *TINY, "model.student.lora.r=4", "trainer.lr=1e-2", f"hydra.run.dir={sft_dir}", cwd=workdir))
    full = summary(workdir / "teacher")["trainable_parameters"]
    assert 0 < summary(sft_dir)["trainable_parameters"] < full / 4
    assert (sft_dir / "model" / "adapter" / "adapter_config.json").is_file()
    AutoModelForCausalLM.from_pretrained(sft_dir / "model")  # the merged model, plain
    dpo_dir = workdir / "dpo_lora"
    ok(pbkd("dpo", *TINY, "model.student.lora.r=4", f"dpo.prefs_path={prefs / 'prefs.jsonl'}", "dpo.beta=0.5",
            "trainer.max_steps=12", "trainer.micro_batch_size=8", "trainer.lr=1e-2", "trainer.log_every=1",
            f"hydra.run.dir={dpo_dir}", cwd=workdir))
    dpo_metrics = [json.loads(line) for line in (dpo_dir / "metrics.jsonl").read_text().splitlines()]
    # Its reference is the start, scored before the first step: margin 0 there, then the adapters move it.
    assert abs(dpo_metrics[0]["dpo/reward_margin"]) < 1e-4 < dpo_metrics[-1]["dpo/reward_margin"]
    assert (dpo_dir / "model" / "adapter").is_dir()
    rm_dir = workdir / "rm_lora"
    ok(pbkd("train-rm", *TINY, "model.rm.lora.r=4", f"train_rm.prefs_path={prefs / 'prefs.jsonl'}",
            f"hydra.run.dir={rm_dir}", cwd=workdir))
    game_dir = workdir / "minmax_lora"
    ok(pbkd("minmax", *TINY, *MINMAX, "model.student.lora.r=4", "model.rm.lora.r=4", "minmax.kl_coef=0.1",
            f"model.teacher.name_or_path={trained_teacher}", f"model.student.name_or_path={sft_dir / 'model'}",
            f"model.rm.name_or_path={rm_dir / 'model'}", f"minmax.prefs_path={prefs / 'prefs.jsonl'}",
            f"hydra.run.dir={game_dir}", cwd=workdir))
    metrics = [json.loads(line) for line in (game_dir / "metrics.jsonl").read_text().splitlines()]
    # The KL to the adapter-disabled start is measured, and grows from 0 as the adapters move.
    assert 0 <= metrics[0]["minmax/pg/kl"] < metrics[-1]["minmax/pg/kl"]
    assert (game_dir / "model" / "adapter").is_dir() and (game_dir / "rm" / "adapter").is_dir()
