"""A run: its directory, its provenance files, its tracker, and the dispatch to a stage."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pbkd_cli.config.schema import PbkdConfig
from pbkd_cli.hub import prepare_repo, push_model
from pbkd_cli.io import PbkdError, atomic_write_json, atomic_write_text
from pbkd_cli.tracking import Tracker

log = logging.getLogger("pbkd")

# stage name -> module under pbkd_cli.stages exposing `run(cfg: PbkdConfig, run: Run) -> dict`
STAGES = {
    "sft": "sft",
    "collect_prefs": "collect_prefs",
    "train_rm": "train_rm",
    "dpo": "dpo",
    "minmax": "minmax",
    "online": "online",
    "eval": "evaluate",
    "pipeline": "pipeline",
}

_PACKAGES = ("pbkd-cli", "torch", "transformers", "tokenizers", "datasets", "deepspeed", "hydra-core",
             "omegaconf", "typer", "wandb", "safetensors")
_REPO = Path(__file__).resolve().parents[1]


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(_REPO), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def config_as_dict(cfg: PbkdConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


# Settings that change how a run is logged or checkpointed, not what it computes: a run may be resumed
# with other values of these. The pipeline's row switches only add steps (each a run of its own, reused
# when done), so a finished pipeline (`make demo`) takes its controls and baselines in its own directory.
RESULT_NEUTRAL = ("resume", "logger", "trainer.log_every", "trainer.checkpoint_every", "trainer.keep_checkpoints",
                  "pipeline.controls", "pipeline.baselines")


def first_difference(old, new, prefix: str = "") -> str | None:
    """The first dotted key whose value differs between two config dicts (RESULT_NEUTRAL aside). A key
    only one of them has is a schema change between pbkd versions, not a different run."""
    if prefix.rstrip(".") in RESULT_NEUTRAL:
        return None
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) & set(new), key=str):
            found = first_difference(old[key], new[key], f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else prefix.rstrip(".")


def check_run_dir(run_dir: Path, config: dict) -> None:
    """A directory that already holds a run (its summary or checkpoints) takes only that run again, to
    resume or redo it: another stage or another config there would overwrite its results, or resume
    from its checkpoints."""
    if run_dir.exists() and not run_dir.is_dir():
        raise PbkdError(f"hydra.run.dir={run_dir}: is a file, not a directory")
    saved = run_dir / "config.yaml"
    if not saved.is_file() or not any((run_dir / name).exists() for name in ("summary.json", "checkpoints")):
        return  # nothing to overwrite or resume from: a run that failed before its first checkpoint
    old = OmegaConf.to_container(OmegaConf.load(saved))
    key = first_difference(old, config)
    if key:
        value = OmegaConf.select(OmegaConf.create(old), key)
        raise PbkdError(f"hydra.run.dir={run_dir}: holds a run with {key}={value}, this one has "
                        f"{key}={OmegaConf.select(OmegaConf.create(config), key)}; give it its own directory")


class Run:
    """What a stage gets besides its config: where to write, and how to log."""

    def __init__(self, cfg: PbkdConfig, run_dir: Path, overrides: list[str], is_main: bool = True):
        self.cfg = cfg
        self.dir = Path(run_dir)
        self.overrides = list(overrides)
        self.is_main = is_main
        config = config_as_dict(cfg)
        check_run_dir(self.dir, config)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self._checkpoints = []
        if is_main:
            atomic_write_text(self.dir / "config.yaml", OmegaConf.to_yaml(config))
            atomic_write_json(self.dir / "run_info.json", {
                "stage": cfg.stage,
                "seed": cfg.seed,
                "overrides": self.overrides,
                "argv": sys.argv,
                "git": git_commit(),
                "packages": package_versions(),
                "python": sys.version.split()[0],
                "platform": platform.platform(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            })
        self.tracker = Tracker(self.dir, cfg.logger, config, name=f"{cfg.stage}-{self.dir.name}", is_main=is_main)

    def checkpoints(self, **engines):
        """Checkpoints of this run's training loop over `engines` (see `engine.checkpoint`)."""
        from pbkd_cli.engine.checkpoint import Checkpoints

        trainer = self.cfg.trainer
        checkpoints = Checkpoints(self.dir / "checkpoints", engines, every=trainer.checkpoint_every,
                                  keep=trainer.keep_checkpoints, resume=self.cfg.resume,
                                  config=config_as_dict(self.cfg), on_restore=self.tracker.rewind)
        self._checkpoints.append(checkpoints)
        return checkpoints

    def resumable_steps(self, desc: str, total: int, batches=None, **engines):
        """A training loop of `total` steps over `engines`: its checkpoints, the loop state the newest
        one saved ({} for a fresh run; `batches`, a `Minibatches`, is put back where it was), and the
        step numbers left to run, 1-based, with progress."""
        checkpoints = self.checkpoints(**engines)
        resumed = checkpoints.restore()
        if resumed and batches is not None:
            batches.load_state_dict(resumed["batches"])
        first = resumed.get("step", 0) + 1
        return checkpoints, resumed, self.tracker.progress(range(first, total + 1), total=total - first + 1, desc=desc)

    def finish(self, summary: dict[str, Any]) -> None:
        """Write `summary.json`: the run's figures, deterministic for a given config and seed."""
        if self.is_main:
            atomic_write_json(self.dir / "summary.json", summary)
            atomic_write_json(self.dir / "timing.json", {"wall_seconds": round(time.time() - self.started, 2)})
        self.tracker.summary(summary)

    def close(self) -> None:
        for checkpoints in self._checkpoints:
            checkpoints.close()
        self.tracker.close()


def run_stage(cfg: PbkdConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Seed everything, run `cfg.stage` in `run_dir`, and return its summary."""
    from pbkd_cli.engine import distributed_context, init_process_group, seed_everything
    from pbkd_cli.engine.distributed import barrier

    if cfg.stage not in STAGES:
        raise PbkdError(f"stage={cfg.stage}: unknown stage (one of {', '.join(STAGES)})")
    stage = importlib.import_module(f"pbkd_cli.stages.{STAGES[cfg.stage]}")
    dist = distributed_context()
    if not dist.is_main:
        log.setLevel(logging.WARNING)  # one copy of the progress lines, from rank 0
    if cfg.stage in ("sft", "train_rm", "dpo"):
        from pbkd_cli.engine.deepspeed_engine import deepspeed_config

        deepspeed_config(cfg.deepspeed, cfg.trainer)  # the batch arithmetic, checked before any model loads
    init_process_group()
    seed_everything(cfg.seed)
    push = cfg.hub.repo_id is not None and dist.is_main
    if push:
        prepare_repo(cfg.hub)
    run = Run(cfg, run_dir, overrides, is_main=dist.is_main)
    try:
        summary = stage.run(cfg, run)
        if push:
            # Before summary.json: a failed push leaves the run unfinished, and rerunning it pushes again.
            log.info("hub: pushed %s to %s", summary["model_dir"], push_model(
                cfg.hub, Path(summary["model_dir"]), f"pbkd {cfg.stage} (seed {cfg.seed}, {run_dir.name})"))
            summary = {**summary, "hub_repo_id": cfg.hub.repo_id}
        run.finish(summary)
        barrier()  # the next stage on any rank may read what rank 0 just wrote
    finally:
        run.close()
    if dist.is_main:
        log.info("%s done: %s", cfg.stage, json.dumps(summary, default=str)[:500])
    return summary


def local_model(role: str, path) -> list[str]:
    """The overrides that point `model.<role>` at a model a step saved (plain safetensors in `path`):
    the GGUF file the configured model may have been read from is not there."""
    return [f"model.{role}.name_or_path={path}", f"model.{role}.gguf_file=null"]


class Steps:
    """How stages that run other stages (`pipeline`, `online`) run them.

    A step is an ordinary stage run in a subdirectory: its config is composed exactly as
    `pbkd <stage>` would compose it (the parent run's overrides, the experiment's
    `stage_overrides[<key>]`), plus the wiring that points it at earlier steps' artefacts. A step whose
    `summary.json` exists is not run again, so a parent that died resumes at the step it was in.
    """

    def __init__(self, run: Run):
        self.run = run
        self.parent_overrides = [o for o in run.overrides if not o.startswith("stage=")]

    def __call__(self, name: str, stage: str, wiring: list[str] = (), overrides_key: str | None = None) -> dict:
        from pbkd_cli.config.compose import compose, to_typed, with_stage_overrides
        from pbkd_cli.engine.distributed import barrier

        step_dir = self.run.dir / name
        barrier()  # every rank sees the same steps as done
        if (step_dir / "summary.json").exists():
            log.info("%s: step %s already done, reusing %s", self.run.cfg.stage, name, step_dir)
            return json.loads((step_dir / "summary.json").read_text())
        overrides = with_stage_overrides(stage, self.parent_overrides, step=overrides_key or name) + list(wiring)
        log.info("%s: step %s (%s) %s", self.run.cfg.stage, name, stage, " ".join(overrides))
        return run_stage(to_typed(compose(overrides)), step_dir, overrides)
