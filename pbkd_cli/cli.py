"""`pbkd`: one command per stage, each a Hydra app over `conf/config.yaml`.

A stage command forwards its trailing arguments to Hydra unchanged, so overrides (`trainer.lr=1e-4`),
experiments (`+exp=demo`), sweeps (`-m seed=1,2,3`), launchers (`hydra/launcher=slurm`) and Hydra's
own flags (`--cfg job`) behave as in any Hydra app. Every job of a run or sweep is composed and
checked against the schema before any work starts.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from pathlib import Path

import typer

from pbkd_cli.config.compose import CONF_DIR, ConfigError, first_job, plan_jobs

app = typer.Typer(
    help="Preference-based knowledge distillation (PbKD) of language models. "
    "Each command runs one stage with Hydra overrides, e.g. `pbkd sft +exp=demo trainer.lr=1e-3`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

def _version(value: bool) -> None:
    """`pbkd --version`: this package's version and git commit, and the versions of what it runs on."""
    if not value:
        return
    from pbkd_cli.runner import git_commit, package_versions

    versions = package_versions()
    commit = git_commit()
    typer.echo(f"pbkd {versions.pop('pbkd-cli')} (git {commit.get('commit') or 'unknown'}"
               f"{', uncommitted changes' if commit.get('dirty') else ''})")
    typer.echo(", ".join(f"{name} {version}" for name, version in versions.items() if version))
    raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Show the version of pbkd and of the libraries it runs on, and exit.")) -> None:
    """Preference-based knowledge distillation (PbKD) of language models."""


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


def _shared_run_dir(stage: str, overrides: list[str], multirun: bool) -> list[str]:
    """Under a multi-process launcher, every rank must write to one run directory; Hydra's default
    (a timestamp) could differ between ranks, so it is derived from the launch's id instead."""
    world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    if world == 1 or multirun or any(o.startswith("hydra.run.dir=") for o in overrides):
        return overrides
    launch_id = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID")
    if not launch_id:
        raise ConfigError(f"hydra.run.dir: {world} processes need one run directory; set hydra.run.dir=...")
    name = f"run-{os.environ['TORCHELASTIC_RUN_ID']}" if "TORCHELASTIC_RUN_ID" in os.environ else f"slurm-{launch_id}"
    return [*overrides, f"hydra.run.dir=outputs/{stage}/{name}"]


def require_creatable_run_dir(overrides: list[str], multirun: bool) -> None:
    """A run directory that is a file, or under a directory this process cannot write to, is a one-line
    error before anything loads (Hydra would fail creating it, with a traceback)."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}=")]
    path = Path(given[-1] if given else "outputs").expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={path}: is a file, not a directory")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key}={path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path}: cannot write in {existing} (read-only or no permission)")


def _launch(stage: str, args: list[str], multirun: bool) -> None:
    flags, overrides = _split_args(args)
    try:
        require_creatable_run_dir(overrides, multirun)
        overrides = _shared_run_dir(stage, overrides, multirun)
        planned = plan_jobs(stage, overrides, multirun)
        if multirun and any(f.split("=", 1)[0] in ("--cfg", "-c", "--info") for f in flags):
            # Hydra refuses --multirun with --cfg/--info: show the sweep's first job instead.
            planned, multirun = plan_jobs(stage, first_job(overrides), False), False
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    sys.argv = [f"pbkd {stage}", *flags, *(["--multirun"] if multirun else []), *planned]
    _hydra_app()


def one_line_exit(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, the one line to print) for the failures a user can act on; None for a bug."""
    from pbkd_cli.engine.checkpoint import Preempted
    from pbkd_cli.io import PbkdError

    if isinstance(exc, (ConfigError, PbkdError)):
        return 2, f"error: {exc}"
    if isinstance(exc, Preempted):
        return exc.exit_code, f"stopped: {exc}"
    full = disk_full(exc)
    if full is not None:
        # Every artefact is written under a temporary name first: nothing half-written is left behind.
        return 2, f"error: no space left on the device writing {full}"
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and exc.filename:
        return 2, f"error: {exc.strerror}: {exc.filename}"
    return None


def disk_full(exc: BaseException) -> str | None:
    """What was being written when the disk or quota ran out ('an artefact' when unnamed), or None.

    Python raises OSError(ENOSPC); safetensors and torch.save wrap it in their own exception types, so
    their messages are read too."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc.filename or "an artefact"
        if any(sign in str(exc) for sign in ("No space left on device", "Disk quota exceeded", "StorageFull")):
            return "an artefact"
        exc = exc.__cause__ or exc.__context__
    return None


def _hydra_app() -> None:
    import hydra

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def hydra_job(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        from pbkd_cli.config.compose import to_typed
        from pbkd_cli.runner import run_stage

        hydra_cfg = HydraConfig.get()
        try:
            run_stage(to_typed(cfg), Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
        except Exception as exc:
            reported = one_line_exit(exc)
            if reported is None:
                raise
            code, message = reported
            print(message, file=sys.stderr)
            sys.exit(code)

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
_stage("dpo", "Preference optimisation (DPO, IPO) of a policy on preference pairs, against itself as it starts.")
_stage("minmax", "Offline PbKD: the min-max game between student and reward model.")
_stage("online", "Online PbKD: iterate collect -> refit RM -> min-max.")
_stage("eval", "Score one or several models on benchmarks (task, GSM8K, multiple choice, ROUGE-L): one table.")
_stage("pipeline", "Every stage in order, ending with the comparison table.")


@app.command("report")
def report(
    paths: list[Path] = typer.Argument(..., help="Run, pipeline or multirun directories (searched recursively)."),
    out: Path | None = typer.Option(None, "--out", help="Report directory (default: <first path>/report)."),
) -> None:
    """Tables (accuracy mean ± std over seeds, per config) and plots (training curves, online
    iterations, RM accuracy) over finished runs, written to report.md and PNGs."""
    from pbkd_cli.report import write_report

    try:
        written = write_report(paths, out, warn=lambda message: typer.echo(f"warning: {message}", err=True))
    except Exception as exc:
        reported = one_line_exit(exc)
        if reported is None:
            raise
        code, message = reported
        typer.echo(message, err=True)
        raise typer.Exit(code)
    typer.echo(f"report: {written / 'report.md'}")


@app.command("serve")
def serve_command(
    model: str = typer.Argument(..., help="A model directory or hub id (safetensors)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on. Any but loopback (e.g. 0.0.0.0) without "
                             "an API key prints a warning: whoever reaches the port can use the model."),
    port: int = typer.Option(8000, help="Port (0: any free port)."),
    name: str = typer.Option("pbkd", help="The model name clients send."),
    api_key_env: str = typer.Option("PBKD_SERVE_API_KEY", help="Environment variable with the API key: when "
                                    "set, requests need `Authorization: Bearer <key>` (else 401)."),
    max_tokens: int | None = typer.Option(None, min=1, help="Largest max_tokens a request may ask for "
                                          "(default: the model's context, at most 4096)."),
    max_body_bytes: int = typer.Option(4 * 2**20, min=1, help="Largest request body; a larger one gets 413."),
    timeout: float = typer.Option(30.0, min=0.1, help="Seconds a connection may stall (sending its request, "
                                  "reading the response) before it is dropped."),
) -> None:
    """Serve a local model behind an OpenAI-compatible chat-completions API (a black-box teacher or judge).

    A test and development server: one generation at a time, no streaming, n at most 16."""
    from pbkd_cli.generation.server import serve

    serve(model, host, port, name, api_key_env=api_key_env, max_tokens=max_tokens, max_body=max_body_bytes,
          timeout_s=timeout)


if __name__ == "__main__":
    app()
