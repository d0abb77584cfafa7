"""Compose configs with Hydra, check them against the schema, and turn failures into one line.

Layering, lowest to highest: `conf/config.yaml` and its groups -> `+exp=...` -> the experiment's
`stage_overrides[<stage>]` -> the user's own overrides. The stage overrides let one experiment
file hold per-stage settings (the RM's learning rate differs from the student's) while every
stage command and the pipeline go through the same composition.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Iterable

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pbkd_cli.config.schema import PbkdConfig, contradiction, out_of_range, unbuildable_model, unplayable_game

CONF_DIR = Path(os.environ.get("PBKD_CONF_DIR", Path(__file__).resolve().parents[2] / "conf"))

ConfigStore.instance().store(name="pbkd_schema", node=PbkdConfig)
# `${pbkd_root:}`: the checkout's root, for configs that name files shipped with it (test fixtures).
OmegaConf.register_new_resolver("pbkd_root", lambda: str(Path(__file__).resolve().parents[2]), replace=True)
# `${pbkd_run_id:}`: one random tag per process, so that two runs started in the same second (a SLURM
# array, a shell loop) get their own default run directories.
_RUN_ID = secrets.token_hex(3)
OmegaConf.register_new_resolver("pbkd_run_id", lambda: _RUN_ID, replace=True)


class ConfigError(ValueError):
    """A config that cannot be composed or fails the schema; the message is one line."""


def _one_line(exc: BaseException) -> str:
    """Reduce Hydra/OmegaConf's multi-line reports to `key: reason`."""
    chain = []
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for err in chain:
        if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
            reason = str(getattr(err, "msg", None) or err).splitlines()[0]
            if "not in struct" in reason or "not in '" in reason:
                reason = "unknown config key (not in the schema, pbkd_cli/config/schema.py)"
            return f"{err.full_key}: {reason}"
    lines = [line.strip() for line in str(chain[0]).splitlines() if line.strip()]
    # Hydra appends its search path and doc links; the first lines say what went wrong.
    lines = [line for line in lines if not line.startswith(("Config search path", "provider=", "See https"))]
    return " ".join(lines)


def compose(overrides: Iterable[str]) -> DictConfig:
    """Compose `conf/config.yaml` with `overrides`, inside or outside a running Hydra app."""
    overrides = list(overrides)
    try:
        if GlobalHydra.instance().is_initialized():
            return hydra_compose(config_name="config", overrides=overrides)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_one_line(exc)) from exc
    except (AssertionError, AttributeError) as exc:  # Hydra's reply to overriding inside a null node
        raise ConfigError(f"cannot apply {' '.join(overrides)}: {exc or type(exc).__name__}") from exc


def with_stage_overrides(stage: str, overrides: list[str], step: str | None = None) -> list[str]:
    """`overrides` with the experiment's per-stage overrides placed before them.

    A stage run alone gets `stage_overrides[<stage>]`; a step of a pipeline or an online run gets
    those and then `stage_overrides[<step>]` (e.g. `teacher` on top of `sft`). Hydra applies
    overrides in order, so where both set a key the user's value wins.
    """
    table = compose([f"stage={stage}", *overrides]).stage_overrides
    keys = [stage] if step in (None, stage) else [stage, step]
    return [f"stage={stage}", *[o for key in keys for o in table.get(key, [])], *overrides]


def to_typed(cfg: DictConfig) -> PbkdConfig:
    """Check a composed config against the schema (missing values included) and return it typed."""
    try:
        # Merging into a fresh struct copy of the schema rejects keys added with `+key=...`.
        schema = OmegaConf.structured(PbkdConfig)
        OmegaConf.set_struct(schema, True)
        # Dicts whose keys the schema leaves open (benchmark entries are still checked against theirs).
        for free_form in ("deepspeed", "stage_overrides", "eval.models", "eval.benchmarks"):
            OmegaConf.set_struct(OmegaConf.select(schema, free_form), False)
        # A plain container: keys Hydra added carry flags that would let them past the schema.
        cfg = OmegaConf.merge(schema, OmegaConf.to_container(cfg, resolve=True))
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"{missing[0]}: missing mandatory value")
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from exc
    bad = out_of_range(typed) or unbuildable_model(typed) or contradiction(typed) or unplayable_game(typed)
    if bad:
        raise ConfigError(bad)
    return typed


def _parse(overrides: list[str]):
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(_one_line(exc)) from exc


def _jobs(parsed) -> list[list[str]]:
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def first_job(overrides: list[str]) -> list[str]:
    """The overrides of a sweep's first job."""
    return _jobs(_parse(overrides))[0]


def plan_jobs(stage: str, overrides: list[str], multirun: bool) -> list[str]:
    """Validate every job of a run or sweep before any work; return the overrides to launch with."""
    parsed = _parse(overrides)
    if not multirun:
        sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
        if sweeps:
            raise ConfigError(f"{sweeps[0]}: a sweep needs -m/--multirun")
        jobs = [overrides]
    else:
        jobs = _jobs(parsed)
    for job in jobs:
        to_typed(compose(with_stage_overrides(stage, job)))
    # Stage overrides come from the experiment, which a sweep cannot change per job.
    return with_stage_overrides(stage, jobs[0])[: -len(jobs[0]) or None] + overrides
