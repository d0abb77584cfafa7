"""Stages that run other stages (`pipeline`, `online`) do it through `Steps`.

A step is an ordinary stage run in a subdirectory: its config is composed exactly as
`pbkd <stage>` would compose it (the parent run's overrides, the experiment's
`stage_overrides[<key>]`), plus the wiring that points it at earlier steps' artefacts. A step whose
`summary.json` exists is not run again, so a parent that died resumes at the step it was in.
"""

from __future__ import annotations

import json
import logging

from pbkd_cli.config.compose import compose, to_typed, with_stage_overrides
from pbkd_cli.engine.distributed import barrier
from pbkd_cli.runner import Run, run_stage

log = logging.getLogger("pbkd")


class Steps:
    def __init__(self, run: Run):
        self.run = run
        self.parent_overrides = [o for o in run.overrides if not o.startswith("stage=")]

    def __call__(self, name: str, stage: str, wiring: list[str] = (), overrides_key: str | None = None) -> dict:
        step_dir = self.run.dir / name
        barrier()  # every rank sees the same steps as done
        if (step_dir / "summary.json").exists():
            log.info("%s: step %s already done, reusing %s", self.run.cfg.stage, name, step_dir)
            return json.loads((step_dir / "summary.json").read_text())
        overrides = with_stage_overrides(stage, self.parent_overrides, step=overrides_key or name) + list(wiring)
        log.info("%s: step %s (%s) %s", self.run.cfg.stage, name, stage, " ".join(overrides))
        return run_stage(to_typed(compose(overrides)), step_dir, overrides)
