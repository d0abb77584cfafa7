"""Run `pbkd` as a user would: a subprocess per command, on tiny models and data, in a temp dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# A model and data set small enough that a stage runs in seconds on 2 CPU cores.
TINY = [
    "logger.mode=disabled",
    "logger.progress_bars=false",
    "data.arithmetic.train_size=96",
    "data.arithmetic.test_size=16",
    "data.max_response_tokens=24",
    "tokenizer.vocab_size=300",
    "tokenizer.corpus_size=300",
    "generation.batch_size=32",
    "trainer.max_steps=4",
    "trainer.micro_batch_size=8",
    "trainer.log_every=2",
    # Hermetic tests: no response cache shared through the home directory.
    "model.teacher.api.cache_dir=null",
    "collect_prefs.judge.cache_dir=null",
]
for role in ("teacher", "student", "rm", "proxy"):
    TINY += [f"model.{role}.tiny.hidden_size=32", f"model.{role}.tiny.num_hidden_layers=1",
             f"model.{role}.tiny.num_attention_heads=2", f"model.{role}.tiny.num_key_value_heads=2",
             f"model.{role}.tiny.intermediate_size=64"]

PREFS = ["collect_prefs.num_prompts=24", "collect_prefs.chunk_prompts=8", "collect_prefs.samples_per_model=2",
         "collect_prefs.max_pairs_per_prompt=2"]
MINMAX = ["minmax.iterations=2", "minmax.prompts_per_iteration=4", "minmax.samples_per_prompt=2",
          "minmax.teacher_samples_per_prompt=1", "minmax.rm_pref_batch=8", "trainer.micro_batch_size=4",
          "trainer.log_every=1"]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def pbkd(*args: str, cwd: Path, timeout: int = 300) -> Result:
    # One thread: the models are tiny, and two test processes then never fight over the cores.
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # A unit test that built an engine in this process filled in launcher variables (and holds their port):
    # a user's `pbkd` starts without them.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "pbkd_cli.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def ok(result: Result) -> Result:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pbkd")


@pytest.fixture(scope="session")
def trained_teacher(workdir) -> Path:
    """A tiny teacher fitted on gold solutions, shared by the tests that need one."""
    run_dir = workdir / "teacher"
    ok(pbkd("sft", *TINY, "sft.model=teacher", "trainer.max_steps=6", f"hydra.run.dir={run_dir}", cwd=workdir))
    return run_dir / "model"


@pytest.fixture(scope="session")
def prefs(workdir, trained_teacher) -> Path:
    """The run directory of a tiny collect-prefs run (teacher-preferred pairs)."""
    run_dir = workdir / "prefs"
    ok(pbkd("collect-prefs", *TINY, *PREFS, f"model.teacher.name_or_path={trained_teacher}",
            f"hydra.run.dir={run_dir}", cwd=workdir))
    return run_dir


@pytest.fixture(scope="session")
def reward_model(workdir, prefs) -> Path:
    run_dir = workdir / "rm"
    ok(pbkd("train-rm", *TINY, f"train_rm.prefs_path={prefs / 'prefs.jsonl'}", "train_rm.heldout_fraction=0.25",
            f"hydra.run.dir={run_dir}", cwd=workdir))
    return run_dir
