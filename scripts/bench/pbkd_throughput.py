#!/usr/bin/env python
"""Throughput and peak memory of PbKD's two hot loops on the demo models.

Runs, in a temporary directory and through the real CLI:
  1. `pbkd collect-prefs` on N prompts (teacher + student sampling, batched, KV cache);
  2. `pbkd train-rm` briefly (only to have an RM);
  3. `pbkd minmax` for a few iterations, one logged row per iteration;
and prints generation tokens/s, the minmax step time by phase, and each process's peak RSS
(peak GPU memory when CUDA is there). Untrained models sample up to max_new_tokens, the worst case;
pass --teacher/--student (model directories, e.g. from `pbkd pipeline +exp=demo`) for trained ones.

    python scripts/bench/pbkd_throughput.py [--prompts 256] [--iterations 8] [--teacher DIR --student DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def run(args: list[str], cwd: Path) -> float:
    """Run `pbkd ...`, return its peak resident memory in MiB (sampled every 50 ms)."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "pbkd_cli.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    handle, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, handle.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    if proc.returncode:
        sys.exit(f"pbkd {args[0]} failed:\n{proc.stderr.read()[-3000:]}")
    return peak / 2**20


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--teacher")
    parser.add_argument("--student")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides for every stage")
    opts = parser.parse_args()
    base = ["+exp=demo", "logger.mode=disabled", *opts.overrides]
    if opts.teacher:
        base.append(f"model.teacher.name_or_path={opts.teacher}")
    if opts.student:
        base.append(f"model.student.name_or_path={opts.student}")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prefs_mem = run(["collect-prefs", *base, f"collect_prefs.num_prompts={opts.prompts}",
                         f"hydra.run.dir={work / 'prefs'}"], work)
        rows = metrics(work / "prefs")
        rm_mem = run(["train-rm", *base, f"train_rm.prefs_path={work / 'prefs' / 'prefs.jsonl'}",
                      "trainer.max_steps=10", f"hydra.run.dir={work / 'rm'}"], work)
        minmax_mem = run(["minmax", *base, f"minmax.iterations={opts.iterations}", "trainer.log_every=1",
                          f"model.rm.name_or_path={work / 'rm' / 'model'}",
                          f"minmax.prefs_path={work / 'prefs' / 'prefs.jsonl'}", f"hydra.run.dir={work / 'minmax'}"],
                         work)
        steps = metrics(work / "minmax")[1:]  # the first iteration pays one-off warm-up costs

    print(f"collect-prefs ({opts.prompts} prompts, teacher + student, k samples each):")
    print(f"  generation      {statistics.mean(r['prefs/tokens_per_second'] for r in rows):10.0f} tokens/s")
    print(f"  peak RSS        {prefs_mem:10.0f} MiB")
    print(f"train-rm peak RSS {rm_mem:10.0f} MiB")
    print(f"minmax step (mean of {len(steps)} iterations after the first):")
    for phase in ("sample", "reward_step", "policy_step"):
        print(f"  {phase:<15} {statistics.mean(r[f'minmax/time/{phase}'] for r in steps):10.3f} s")
    total = statistics.mean(sum(r[f"minmax/time/{p}"] for p in ("sample", "reward_step", "policy_step")) for r in steps)
    print(f"  whole step      {total:10.3f} s")
    print(f"  sampling        {statistics.mean(r['minmax/time/sample_tokens_per_second'] for r in steps):10.0f} tokens/s")
    print(f"  peak RSS        {minmax_mem:10.0f} MiB")


if __name__ == "__main__":
    main()
