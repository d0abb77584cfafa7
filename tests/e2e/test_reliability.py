"""Scale-out and faults through the CLI: several ranks, kill and resume, pre-emption, hostile input."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import MINMAX, TINY, ok, pbkd, summary

SFT = [*TINY, "trainer.max_steps=30", "trainer.log_every=5", "trainer.checkpoint_every=3"]


def figures(run_dir: Path) -> dict:
    """A run's summary without the paths, which name its directory."""
    return {k: v for k, v in summary(run_dir).items() if not k.endswith(("_dir", "_path"))}


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pbkd_cli.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_after_first_checkpoint(args: list[str], run_dir: Path, cwd: Path, timeout: float = 120) -> int:
    """Start the run, SIGKILL it as soon as it has committed a checkpoint; the step that holds."""
    proc = start(args, cwd)
    latest = run_dir / "checkpoints" / "latest.json"
    deadline = time.time() + timeout
    while not latest.exists():
        assert proc.poll() is None, f"the run ended before its first checkpoint:\n{proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists(), "the kill must land midway"
    return json.loads(latest.read_text())["step"]


@pytest.fixture(scope="module")
def uninterrupted_sft(workdir) -> Path:
    run_dir = workdir / "sft_uninterrupted"
    ok(pbkd("sft", *SFT, f"hydra.run.dir={run_dir}", cwd=workdir))
    return run_dir


def test_sft_killed_and_resumed_ends_with_the_uninterrupted_figures(workdir, uninterrupted_sft):
    run_dir = workdir / "sft_killed"
    args = ["sft", *SFT, f"hydra.run.dir={run_dir}"]
    assert kill_after_first_checkpoint(args, run_dir, workdir) < 30
    assert not (run_dir / "model").exists()
    resumed = ok(pbkd(*args, cwd=workdir))
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert figures(run_dir) == figures(uninterrupted_sft)
    # The rows logged after the checkpoint were dropped and logged again: one row per logged step.
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20, 25, 30]


def test_sigterm_saves_a_checkpoint_stops_and_resumes(workdir, uninterrupted_sft):
    """SLURM pre-emption: the run saves at the end of its step and exits 128 + SIGTERM."""
    run_dir = workdir / "sft_preempted"
    args = ["sft", *SFT, "trainer.checkpoint_every=0", f"hydra.run.dir={run_dir}"]
    proc = start(args, workdir)
    while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("stopped: SIGTERM at step") and f"hydra.run.dir={run_dir}" in last
    assert (run_dir / "checkpoints" / "latest.json").exists() and not (run_dir / "summary.json").exists()
    ok(pbkd(*args, cwd=workdir))
    assert figures(run_dir) == figures(uninterrupted_sft)


def test_minmax_killed_and_resumed_ends_with_the_uninterrupted_figures(workdir, trained_teacher, prefs,
                                                                         reward_model):
    # eval_every: the held-out accuracy measured before the first step must survive the resume.
    game = [*TINY, *MINMAX, "minmax.iterations=8", "trainer.checkpoint_every=2", "minmax.eval_every=4",
            "minmax.eval_prompts=4", f"model.teacher.name_or_path={trained_teacher}", f"model.rm.name_or_path={reward_model / 'model'}",
            f"minmax.prefs_path={prefs / 'prefs.jsonl'}"]
    clean = workdir / "minmax_uninterrupted"
    ok(pbkd("minmax", *game, f"hydra.run.dir={clean}", cwd=workdir))
    run_dir = workdir / "minmax_killed"
    args = ["minmax", *game, f"hydra.run.dir={run_dir}"]
    assert kill_after_first_checkpoint(args, run_dir, workdir) < 8
    ok(pbkd(*args, cwd=workdir))
    assert figures(run_dir) == figures(clean)
    assert figures(run_dir)["final"]  # the settled game figures, compared above
    assert "heldout_accuracy_at_start" in figures(run_dir)


def test_dpo_killed_and_resumed_ends_with_the_uninterrupted_figures(workdir, prefs):
    """The reference log-probs are recomputed from the starting weights, not from the checkpoint's."""
    po = [*TINY, f"dpo.prefs_path={prefs / 'prefs.jsonl'}", "trainer.max_steps=30", "trainer.micro_batch_size=4",
          "trainer.checkpoint_every=5", "trainer.log_every=5"]
    clean = workdir / "dpo_uninterrupted"
    ok(pbkd("dpo", *po, f"hydra.run.dir={clean}", cwd=workdir))
    run_dir = workdir / "dpo_killed"
    args = ["dpo", *po, f"hydra.run.dir={run_dir}"]
    assert kill_after_first_checkpoint(args, run_dir, workdir) < 30
    ok(pbkd(*args, cwd=workdir))
    assert figures(run_dir) == figures(clean) and figures(run_dir)["final"]["reward_margin"] != 0


def test_resume_false_starts_over(workdir, uninterrupted_sft):
    run_dir = workdir / "sft_restart"
    shutil.copytree(uninterrupted_sft, run_dir)
    (run_dir / "summary.json").unlink()
    result = ok(pbkd("sft", *SFT, "resume=false", f"hydra.run.dir={run_dir}", cwd=workdir))
    logged = result.stdout + result.stderr
    assert "resuming from" not in logged and "starting over" in logged
    assert figures(run_dir) == figures(uninterrupted_sft)


# -- several ranks -------------------------------------------------------------------------------

def torchrun(*args: str, cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", "-m", "pbkd_cli.cli", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_sft_under_torchrun_with_zero2_writes_one_run(workdir):
    cwd = workdir / "torchrun_zero2"
    cwd.mkdir()
    result = torchrun("sft", *TINY, "deepspeed=zero2", "trainer.global_batch_size=16", cwd=cwd)
    assert result.returncode == 0, result.stderr[-5000:]
    # Both ranks wrote into one directory named after the launch, not two timestamped ones.
    runs = list((cwd / "outputs" / "sft").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("run-")
    run_dir = runs[0]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4], "rank 1 must not log rows of its own"
    assert (run_dir / "model" / "model.safetensors").exists()
    assert not list(run_dir.glob(".*.tmp"))


def test_sft_under_torchrun_with_zero3_resumes_its_sharded_checkpoint(workdir):
    run_dir = workdir / "torchrun_zero3"
    args = ["sft", *TINY, "deepspeed=zero3", "trainer.max_steps=6", "trainer.checkpoint_every=2",
            "trainer.keep_checkpoints=3", f"hydra.run.dir={run_dir}"]
    result = torchrun(*args, cwd=workdir)
    assert result.returncode == 0, result.stderr[-5000:]
    complete = figures(run_dir)
    step4 = run_dir / "checkpoints" / "step-000004"
    assert {p.name for p in (step4 / "policy").glob("*optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    # Back to the state of step 4, as if the job had died there.
    shutil.rmtree(run_dir / "checkpoints" / "step-000006")
    shutil.rmtree(run_dir / "model")
    (run_dir / "summary.json").unlink()
    (run_dir / "checkpoints" / "latest.json").write_text(json.dumps({"step": 4, "dir": "step-000004"}))
    result = torchrun(*args, cwd=workdir)
    assert result.returncode == 0, result.stderr[-5000:]
    assert figures(run_dir) == complete


def test_global_batch_size_that_does_not_add_up_is_one_line(workdir):
    result = pbkd("sft", *TINY, "trainer.global_batch_size=100", "hydra.run.dir=bad_batch", cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: trainer.global_batch_size=100: micro_batch_size 8 x grad_accum 1 x 1 ranks = 8")


# -- hostile input -------------------------------------------------------------------------------

def last_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


def test_malformed_preference_line_names_the_file_and_line(workdir, prefs):
    bad = workdir / "bad_prefs.jsonl"
    lines = (prefs / "prefs.jsonl").read_text().splitlines()
    bad.write_text("\n".join([lines[0], lines[1], '{"prompt": "Q", "chosen": ', lines[2]]) + "\n")
    result = pbkd("train-rm", *TINY, f"train_rm.prefs_path={bad}", "hydra.run.dir=rm_bad", cwd=workdir)
    assert result.returncode == 2
    assert last_line(result).startswith(f"error: train_rm.prefs_path={bad} line 3: invalid JSON")
    assert not (workdir / "rm_bad" / "model").exists()


@pytest.mark.parametrize("content, message", [("", "no preference pairs"),
                                               ('{"prompt": "Q", "chosen": "a"}\n', "line 1: missing 'rejected', or neither a string nor a list of messages")])
def test_empty_or_incomplete_preferences_are_one_line(workdir, content, message):
    path = workdir / "few_prefs.jsonl"
    path.write_text(content)
    result = pbkd("train-rm", *TINY, f"train_rm.prefs_path={path}", "hydra.run.dir=rm_empty", cwd=workdir)
    assert result.returncode == 2 and message in last_line(result)


def test_a_run_directory_takes_only_its_own_run(workdir, trained_teacher):
    run_dir = trained_teacher.parent
    before = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "summary.json", "run_info.json")}
    result = pbkd("sft", *TINY, "sft.model=student", f"hydra.run.dir={run_dir}", cwd=workdir)
    assert result.returncode == 2
    assert last_line(result).startswith(f"error: hydra.run.dir={run_dir}: holds a run with ")
    assert {name: (run_dir / name).read_bytes() for name in before} == before


def test_empty_train_split_is_one_line(workdir):
    result = pbkd("sft", *TINY, "data.train_limit=0", "hydra.run.dir=sft_empty", cwd=workdir)
    assert result.returncode == 2 and last_line(result) == "error: data: the train split is empty"


def gsm8k_jsonl(path: Path, rows: int, offset: int = 0) -> Path:
    """`rows` word problems in the GSM8K format: a question, and a worked answer ending in `#### n`."""
    pairs = [(i % 9 + 1, i // 9 + 2) for i in range(offset, offset + rows)]
    path.write_text("".join(json.dumps({
        "question": f"Mia has {a} apples and buys {b} more. How many apples does she have?",
        "answer": f"Mia has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}) + "\n" for a, b in pairs))
    return path


# Local GSM8K files on the tiny models; a hub id no cache can hold, so the hub is never there.
LOCAL_GSM8K = ["data=gsm8k", "data.use_chat_template=false", "data.max_prompt_tokens=128",
               "data.hub_id=pbkd-tests/no-such-data-set"]


def test_sft_on_a_local_train_file_alone_trains_saves_and_leaves_out_the_test_figure(workdir, tmp_path):
    train = gsm8k_jsonl(tmp_path / "train.jsonl", 32)
    alone = tmp_path / "sft_train_only"
    result = ok(pbkd("sft", *TINY, *LOCAL_GSM8K, f"data.train_path={train}", f"hydra.run.dir={alone}", cwd=workdir))
    assert summary(alone)["test_gold_nll"] is None and (alone / "model" / "model.safetensors").is_file()
    assert "no test split, so no test_gold_nll in the summary: data.hub_id=pbkd-tests/no-such-data-set" in (
        result.stdout + result.stderr)
    with_test = tmp_path / "sft_with_test"
    ok(pbkd("sft", *TINY, *LOCAL_GSM8K, f"data.train_path={train}",
            f"data.test_path={gsm8k_jsonl(tmp_path / 'test.jsonl', 8, offset=32)}", f"hydra.run.dir={with_test}",
            cwd=workdir))
    assert summary(with_test)["test_gold_nll"] > 0
    # A test file that is set but missing stops the run before any training.
    missing = tmp_path / "sft_missing_test"
    result = pbkd("sft", *TINY, *LOCAL_GSM8K, f"data.train_path={train}",
                  f"data.test_path={tmp_path / 'nope.jsonl'}", f"hydra.run.dir={missing}", cwd=workdir)
    assert result.returncode == 2
    assert last_line(result) == f"error: data.test_path={tmp_path / 'nope.jsonl'}: no such file"
    assert not (missing / "model").exists() and (missing / "metrics.jsonl").read_text() == ""


def test_overlong_prompts_are_dropped_or_truncated_and_counted(workdir):
    # The arithmetic prompts run from about 60 to 85 tokens with this tokenizer.
    dropped = workdir / "sft_drop"
    ok(pbkd("sft", *TINY, "data.max_prompt_tokens=72", "data.overlong_prompts=drop", f"hydra.run.dir={dropped}",
            cwd=workdir))
    truncated = workdir / "sft_truncate"
    ok(pbkd("sft", *TINY, "data.max_prompt_tokens=72", f"hydra.run.dir={truncated}", cwd=workdir))
    count = summary(truncated)["overlong_prompts"]
    assert 0 < count < 96
    assert summary(dropped)["overlong_prompts"] == count
    assert summary(dropped)["train_pairs"] == 96 - count and summary(truncated)["train_pairs"] == 96
    result = pbkd("sft", *TINY, "data.max_prompt_tokens=3", "data.overlong_prompts=drop", "hydra.run.dir=sft_none",
                  cwd=workdir)
    assert result.returncode == 2
    assert last_line(result) == ("error: data.max_prompt_tokens=3: every sft train prompt is longer "
                                 "(data.overlong_prompts=drop left nothing)")


def tokenizer_copy(model_dir: Path, target: Path, **special) -> Path:
    from transformers import AutoTokenizer

    shutil.copytree(model_dir, target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    for name, value in special.items():
        setattr(tokenizer, name, value)
    tokenizer.save_pretrained(target)
    return target


def test_tokenizer_without_pad_token_pads_with_eos(workdir, trained_teacher):
    model = tokenizer_copy(trained_teacher, workdir / "no_pad_model", pad_token=None)
    result = ok(pbkd("eval", *TINY, f"model.student.name_or_path={model}", "hydra.run.dir=eval_no_pad", cwd=workdir))
    assert "tokenizer has no pad token; using eos" in result.stdout + result.stderr


def test_tokenizer_without_eos_or_pad_is_one_line(workdir, trained_teacher):
    model = tokenizer_copy(trained_teacher, workdir / "no_eos_model", pad_token=None, eos_token=None)
    result = pbkd("eval", *TINY, f"model.student.name_or_path={model}", "hydra.run.dir=eval_no_eos", cwd=workdir)
    assert result.returncode == 2
    assert last_line(result) == "error: model.student: the tokenizer has no eos token; generation could not stop"


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(workdir):
    run_dir = workdir / "sft_nan"
    # An absurd learning rate overflows the weights in the first update.
    result = pbkd("sft", *TINY, "trainer.lr=1e30", "trainer.warmup_ratio=0", "trainer.lr_schedule=constant",
                  "trainer.checkpoint_every=1", f"hydra.run.dir={run_dir}", cwd=workdir)
    assert result.returncode == 2
    match = re.fullmatch(r"error: loss is not finite \((nan|inf)\) at step (\d+); stopped before the update, "
                         r"the checkpoint of step (\d+) is kept in (\S+)", last_line(result))
    assert match, last_line(result)
    step, kept, path = int(match[2]), int(match[3]), Path(match[4])
    assert kept == step - 1 and path == run_dir / "checkpoints" / f"step-{kept:06d}"
    assert (path / "state.json").exists()
    assert not (run_dir / "model").exists() and not (run_dir / "summary.json").exists()


def test_collect_prefs_and_eval_under_torchrun_share_the_work_and_write_once(workdir, trained_teacher, prefs):
    """Each rank samples its share of the prompts; rank 0 alone writes, in the single-process order."""
    from pbkd_cli.data.preferences import load_preferences

    from .conftest import PREFS

    run_dir = workdir / "torchrun_prefs"
    result = torchrun("collect-prefs", *TINY, *PREFS, f"model.teacher.name_or_path={trained_teacher}",
                      f"hydra.run.dir={run_dir}", cwd=workdir)
    assert result.returncode == 0, result.stderr[-5000:]
    pairs = load_preferences(run_dir / "prefs.jsonl")
    assert len(pairs) == summary(prefs)["pairs"] == len({p.id for p in pairs})
    assert [p.id for p in pairs] == [p.id for p in load_preferences(prefs / "prefs.jsonl")]

    single, double = workdir / "eval_one_rank", workdir / "eval_two_ranks"
    ok(pbkd("eval", *TINY, f"model.student.name_or_path={trained_teacher}", f"hydra.run.dir={single}", cwd=workdir))
    result = torchrun("eval", *TINY, f"model.student.name_or_path={trained_teacher}", f"hydra.run.dir={double}",
                      cwd=workdir)
    assert result.returncode == 0, result.stderr[-5000:]
    # Greedy decoding: the same predictions whichever rank made them.
    assert (double / "predictions.jsonl").read_text() == (single / "predictions.jsonl").read_text()
    assert figures(double) == figures(single)


def test_sft_and_eval_on_conversational_prompt_completion_data(workdir, tmp_path):
    def chats(path, offset, rows):
        path.write_text("".join(json.dumps({"messages": [
            {"role": "system", "content": "Answer with the sum."},
            {"role": "user", "content": f"Add {a} and {b}."},
            {"role": "assistant", "content": f" {a} + {b} = {a + b}. #### {a + b}"}]}) + "\n"
            for a, b in [(i % 9 + 1, i // 9 + 2) for i in range(offset, offset + rows)]))
        return path

    custom = ["data.task=custom", f"data.train_path={chats(tmp_path / 'train.jsonl', 0, 48)}",
              f"data.test_path={chats(tmp_path / 'test.jsonl', 48, 8)}"]
    run_dir = tmp_path / "sft_custom"
    ok(pbkd("sft", *TINY, *custom, "trainer.max_steps=24", "trainer.lr=1e-2", f"hydra.run.dir={run_dir}", cwd=workdir))
    losses = [json.loads(line)["sft/loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.75 * losses[0], losses  # it learns the completions
    assert summary(run_dir)["train_pairs"] == 48
    eval_dir = tmp_path / "eval_custom"
    ok(pbkd("eval", *TINY, *custom, f"model.student.name_or_path={run_dir / 'model'}", f"hydra.run.dir={eval_dir}",
            cwd=workdir))
    result = summary(eval_dir)
    assert result["n"] == 8 and 0.0 <= result["rouge_l"] <= 1.0 and 0.0 <= result["accuracy"] <= 1.0


def test_a_single_process_run_opens_no_rendezvous_port(workdir):
    # Another process holds the port the run is told to use: a TCP rendezvous would fail to bind it.
    import socket

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(taken.getsockname()[1]))
        proc = subprocess.run([sys.executable, "-m", "pbkd_cli.cli", "sft", *TINY, "trainer.max_steps=2",
                               "hydra.run.dir=sft_port_taken"], cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
