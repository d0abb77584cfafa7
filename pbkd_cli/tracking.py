"""Metrics to `metrics.jsonl`, the console and Weights & Biases (offline unless asked otherwise)."""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

from pbkd_cli.config.schema import LoggerConfig, WandbMode
from pbkd_cli.engine.distributed import reduce_metrics

log = logging.getLogger("pbkd")
T = TypeVar("T")


def logged_progress(iterable: Iterable[T], total: int | None, desc: str, every_s: float) -> Iterator[T]:
    """`iterable`, with a log line (done/total, rate, ETA) at most every `every_s` seconds and at the
    end: the progress a redirected or SLURM log shows, where a bar would be one long garbled line."""
    started = last = time.monotonic()
    done = 0
    for done, item in enumerate(iterable, start=1):
        yield item
        now = time.monotonic()
        if now - last >= every_s or done == total:
            rate = done / max(now - started, 1e-9)
            eta = f", ETA {(total - done) / rate:.0f} s" if total and done < total else ""
            log.info("%s: %d/%s (%.3g/s%s)", desc, done, total if total is not None else "?", rate, eta)
            last = now


class Tracker:
    """One run's metric sink. Only the main process writes; the others are silent."""

    # Progress lines in a plain (non-terminal) log, at most this often.
    PLAIN_PROGRESS_S = 30.0

    def __init__(self, run_dir: Path, cfg: LoggerConfig, config: dict, name: str, is_main: bool):
        self.is_main = is_main
        self.plain_progress = cfg.progress_bars and is_main and not sys.stderr.isatty()
        self.progress_bars = cfg.progress_bars and is_main and sys.stderr.isatty()
        if not self.progress_bars:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        self._metrics_path = run_dir / "metrics.jsonl"
        self._metrics = self._metrics_path.open("a", encoding="utf-8") if is_main else None
        self._wandb = None
        if is_main and cfg.mode != WandbMode.disabled:
            import wandb  # imported lazily: it starts a service process

            # A rerun in the same directory (a resumed run) continues the same W&B run.
            id_file = run_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(8)
            id_file.write_text(run_id + "\n")

            # The API key is read by wandb from WANDB_API_KEY; it is never part of `config`.
            self._wandb = wandb.init(
                mode=cfg.mode.value,
                project=cfg.project,
                entity=cfg.entity,
                group=cfg.group,
                tags=list(cfg.tags),
                name=name,
                dir=str(run_dir),
                config=config,
                id=run_id,
                resume="allow",
                reinit="create_new",
            )

    def log(self, metrics: dict[str, Any], step: int, prefix: str = "", reduce: bool = True) -> dict[str, Any]:
        """Record `metrics` averaged over ranks and return them averaged. With `reduce`, every rank
        calls this; `reduce=False` logs figures rank 0 already holds for the whole run."""
        metrics = {k: _plain(v) for k, v in metrics.items()}
        if reduce:
            metrics = reduce_metrics(metrics)
        if not self.is_main:
            return metrics
        row = {f"{prefix}{k}": v for k, v in metrics.items()}
        self._metrics.write(json.dumps({"step": step, **row}) + "\n")
        self._metrics.flush()
        if self._wandb is not None:
            self._wandb.log(row, step=step)
        shown = " ".join(f"{k}={_short(v)}" for k, v in row.items())
        log.info("step %d %s", step, shown)
        return metrics

    def rewind(self, step: int) -> None:
        """Forget the rows logged after `step`: a resumed run logs them again from its checkpoint."""
        if not self.is_main:
            return
        self._metrics.flush()
        keep = 0
        with self._metrics_path.open("rb") as handle:
            for line in handle:
                try:
                    if json.loads(line).get("step", 0) > step:
                        break
                except json.JSONDecodeError:  # a line cut off by a kill
                    break
                keep += len(line)
        os.truncate(self._metrics_path, keep)

    def summary(self, summary: dict[str, Any]) -> None:
        if self._wandb is not None:
            self._wandb.summary.update({k: v for k, v in summary.items() if not isinstance(v, (dict, list))})

    def progress(self, iterable: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
        """A bar on a terminal, log lines with rate and ETA in a plain log, nothing on other ranks."""
        if self.plain_progress:
            return logged_progress(iterable, total, desc, self.PLAIN_PROGRESS_S)
        return tqdm(iterable, total=total, desc=desc, disable=not self.progress_bars, leave=False)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self._wandb is not None:
            self._wandb.finish()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
