"""`pbkd`: one command per stage, each a Hydra app over `conf/config.yaml`.

A stage command forwards its trailing arguments to Hydra unchanged, so overrides (`trainer.lr=1e-4`),
experiments (`+exp=demo`), sweeps (`-m seed=1,2,3`), launchers (`hydra/launcher=slurm`) and Hydra's
own flags (`--cfg job`) behave as in any Hydra app. Every job of a run or sweep is composed and
checked against the schema before any work starts.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import typer

from pbkd_cli.config.compose import CONF_DIR, ConfigError, plan_jobs

app = typer.Typer(
    help="Preference-based knowledge distillation (PbKD) of language models. "
    "Each command runs one stage with Hydra overrides, e.g. `pbkd sft +exp=demo trainer.lr=1e-3`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "--config-name", "-cn",
                           "--config-dir", "-cd", "--experimental-rerun"}
_HYDRA_FLAGS = {"--resolve", "--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc"}


def _config_groups() -> str:
    groups = []
    for folder in sorted(p for p in CONF_DIR.rglob("*") if p.is_dir()):
        options = sorted(f.stem for f in folder.glob("*.yaml"))
        if options:
            groups.append(f"{folder.relative_to(CONF_DIR).as_posix()}: {', '.join(options)}")
    return "Config groups (pick with group=option, experiments with +exp=NAME):\n\n" + "\n\n".join(groups)


def _split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Separate Hydra's flags from overrides; take `--local_rank=N` from the deepspeed launcher."""
    flags, overrides, i = [], [], 0
    while i < len(args):
        arg = args[i]
        match = re.fullmatch(r"--local[_-]rank=?(\d*)", arg)
        if match:
            value = match.group(1) or args[i + 1]
            os.environ["LOCAL_RANK"] = value
            i += 1 if match.group(1) else 2
            continue
        name = arg.split("=", 1)[0]
        if name in _HYDRA_FLAGS_WITH_VALUE:
            takes_next = "=" not in arg and i + 1 < len(args)
            flags.extend(args[i:i + 2] if takes_next else [arg])
            i += 2 if takes_next else 1
        elif arg in _HYDRA_FLAGS:
            flags.append(arg)
            i += 1
        else:
            overrides.append(arg)
            i += 1
    return flags, overrides


def _launch(stage: str, args: list[str], multirun: bool) -> None:
    flags, overrides = _split_args(args)
    try:
        planned = plan_jobs(stage, overrides, multirun)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    sys.argv = [f"pbkd {stage}", *flags, *(["--multirun"] if multirun else []), *planned]
    _hydra_app()


def _hydra_app() -> None:
    import hydra

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def hydra_job(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        from pbkd_cli.config.compose import to_typed
        from pbkd_cli.io import PbkdError
        from pbkd_cli.runner import run_stage

        hydra_cfg = HydraConfig.get()
        try:
            run_stage(to_typed(cfg), Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
        except (ConfigError, PbkdError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    hydra_job()


_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": ["--help"]}


def _stage(name: str, summary: str):
    def command(
        ctx: typer.Context,
        multirun: bool = typer.Option(False, "--multirun", "-m", help="Sweep: one job per combination."),
    ) -> None:
        _launch(name.replace("-", "_"), list(ctx.args), multirun)

    help_text = (f"{summary}\n\nTrailing arguments are Hydra overrides (key=value, group=option, +exp=NAME); "
                 f"`--cfg job` prints the composed config.\n\n{_config_groups()}")
    app.command(name=name, context_settings=_CONTEXT, help=help_text, short_help=summary)(command)


_stage("sft", "Supervised fine-tuning on gold or teacher responses (vanilla black-box KD).")
_stage("collect-prefs", "Sample teacher and student responses and label preference pairs.")
_stage("train-rm", "Fit the reward model to preference pairs by Bradley-Terry MLE.")
_stage("minmax", "Offline PbKD: the min-max game between student and reward model.")
_stage("online", "Online PbKD: iterate collect -> refit RM -> min-max.")
_stage("eval", "Exact-match accuracy of a model on the test split.")
_stage("pipeline", "Every stage in order, ending with the comparison table.")


if __name__ == "__main__":
    app()
