#!/usr/bin/env bash
# GPU check: the demo's teacher SFT in bf16 on every GPU of this machine, under DeepSpeed ZeRO-2 and
# then ZeRO-3 (torchrun --standalone, one rank per GPU), then a table of wall time, time per step
# and throughput for each.
#
#   make gpu-check                                   # PBKD_BIN=.venv/bin
#   scripts/gpu_check.sh [extra hydra overrides...]  # e.g. trainer.micro_batch_size=64
#
# Environment:
#   PBKD_BIN               folder holding `python` and `torchrun` (make passes .venv/bin); unset: PATH
#   PBKD_GPUS              ranks (default: every GPU torch sees)
#   PBKD_GPU_CHECK_STEPS   optimiser steps per run (default 50)
#   PBKD_GPU_CHECK_STAGES  DeepSpeed configs to run, in order (default "zero2 zero3")
#   PBKD_GPU_CHECK_DIR     where the run directories go (default outputs/gpu_check/<date_time>)
#   PBKD_DRY_RUN=1         print the commands (one line each, shell-quoted) and exit 0; no GPU needed
#
# Each run writes to <dir>/<deepspeed config>/. "s/step" is the run's wall time over its steps, so it
# includes start-up; tokens/s is the last logged sft/tokens_per_second (a mean over ranks) and the
# total is that times the number of ranks.

set -euo pipefail

NAME=gpu_check.sh
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() {
    echo "$NAME: error: $*" >&2
    exit 1
}

dry_run="${PBKD_DRY_RUN:-0}"
bin="${PBKD_BIN:-}"
python="${bin:+$bin/}python"
torchrun="${bin:+$bin/}torchrun"
steps="${PBKD_GPU_CHECK_STEPS:-50}"
read -r -a zero_stages <<< "${PBKD_GPU_CHECK_STAGES:-zero2 zero3}"
[[ ${#zero_stages[@]} -gt 0 ]] || die "PBKD_GPU_CHECK_STAGES is empty"
root="${PBKD_GPU_CHECK_DIR:-outputs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}"

if [[ "$dry_run" != 1 ]]; then
    command -v "$python" > /dev/null || die "$python not found (set PBKD_BIN to the folder holding python and torchrun)"
    if ! "$python" -c 'import torch; assert torch.cuda.is_available()' 2> /dev/null; then
        die "no GPU: \`$python -c 'import torch; assert torch.cuda.is_available()'\` failed; run this on a machine with a CUDA GPU and a CUDA build of torch"
    fi
fi
gpus="${PBKD_GPUS:-}"
if [[ -z "$gpus" ]]; then
    gpus="$("$python" -c 'import torch; print(torch.cuda.device_count())' 2> /dev/null || echo 0)"
    if [[ "$gpus" == 0 ]]; then
        [[ "$dry_run" == 1 ]] || die "torch sees no GPU"
        gpus=1  # dry run on a machine without one
    fi
fi
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "the GPU count '$gpus' is not a positive integer (set PBKD_GPUS)"

quoted() {
    printf '%q' "$1"
    shift
    printf ' %q' "$@"
    printf '\n'
}

failed=0
for zero in "${zero_stages[@]}"; do
    cmd=("$torchrun" --standalone "--nproc_per_node=$gpus" -m pbkd_cli.cli sft
         +exp=demo sft.model=teacher sft.source=gold "deepspeed=$zero" deepspeed.bf16.enabled=true
         model.teacher.dtype=bfloat16 "trainer.max_steps=$steps" logger.mode=disabled
         "hydra.run.dir=$root/$zero")
    for arg in "$@"; do
        cmd+=("$arg")
    done
    if [[ "$dry_run" == 1 ]]; then
        quoted "${cmd[@]}"
        continue
    fi
    echo "$NAME: $zero on $gpus GPU(s): $(quoted "${cmd[@]}")" >&2
    if ! "${cmd[@]}"; then
        echo "$NAME: $zero failed" >&2
        failed=1
    fi
done
if [[ "$dry_run" == 1 ]]; then
    exit 0
fi

"$python" - "$root" "$gpus" "${zero_stages[@]}" <<'EOF'
import json
import sys
from pathlib import Path

root, gpus, stages = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]


def read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


rows = [("deepspeed", "wall s", "s/step", "tokens/s/rank", f"tokens/s x{gpus}")]
for stage in stages:
    run = root / stage
    timing, summary = read_json(run / "timing.json"), read_json(run / "summary.json")
    if not timing or not summary:
        rows.append((stage, "failed", "-", "-", "-"))
        continue
    tokens = None
    try:
        for line in (run / "metrics.jsonl").read_text().splitlines():
            try:
                tokens = json.loads(line).get("sft/tokens_per_second", tokens)
            except ValueError:
                pass
    except OSError:
        pass
    wall, steps = timing["wall_seconds"], summary["steps"]
    rows.append((stage, f"{wall:.1f}", f"{wall / steps:.3f}",
                 "-" if tokens is None else f"{tokens:,.0f}",
                 "-" if tokens is None else f"{tokens * gpus:,.0f}"))
widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
print(f"\ngpu check: {gpus} GPU(s), bf16, runs in {root}")
for n, row in enumerate(rows):
    print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    if n == 0:
        print("  ".join("-" * w for w in widths))
EOF
exit "$failed"
