"""Checkpoints of a training loop: its engines, every RNG, its data position, and pre-emption.

Layout under the run directory:

    checkpoints/step-000040/<engine name>/...   DeepSpeed's own checkpoint (weights, optimiser, scheduler)
    checkpoints/step-000040/rng-rank<r>.pt      torch / numpy / python RNG states of rank r
    checkpoints/step-000040/state.json          the loop's own state (step, data position, ...)
    checkpoints/step-000040/manifest.json       the sha256 of every other file in the step directory
    checkpoints/latest.json                     which step directory is complete

A step directory is written under a temporary name and renamed once every rank has finished, and
`latest.json` is replaced atomically after that, so a process killed while saving leaves the
previous checkpoint in charge. DeepSpeed's files are pickles, and unpickling runs code: resuming
first checks every file against the manifest written when it was saved and refuses a checkpoint
with a changed, missing or extra file (RNG states load weights-only, the loop's state is JSON).
SIGTERM and SIGUSR1 (SLURM's pre-emption warnings) do not kill the loop: it finishes the current
step, saves, and stops with `Preempted`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pbkd_cli.engine.distributed import any_rank, barrier, distributed_context
from pbkd_cli.io import PbkdError, atomic_write_json

log = logging.getLogger("pbkd")

_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_LATEST = "latest.json"
_MANIFEST = "manifest.json"


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` but its manifest, by path relative to it."""
    digests = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != _MANIFEST):
        sha = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(2**20), b""):
                sha.update(block)
        digests[path.relative_to(directory).as_posix()] = sha.hexdigest()
    return digests


def verify_manifest(directory: Path) -> None:
    """Refuse (one line) a checkpoint whose files are not exactly those it was saved with."""
    manifest = directory / _MANIFEST
    if not manifest.is_file():
        raise PbkdError(f"checkpoint {directory}: no {_MANIFEST} to check its files against (not saved by this "
                        f"version of pbkd); refusing to unpickle it; resume=false starts over")
    saved = json.loads(manifest.read_text())["sha256"]
    found = file_digests(directory)
    for name in sorted(set(saved) | set(found)):
        problem = ("is missing" if name not in found else "was not in it when it was saved" if name not in saved
                   else "differs from the file that was saved" if found[name] != saved[name] else None)
        if problem:
            raise PbkdError(f"checkpoint {directory}: {name} {problem}; refusing to load it "
                            f"(its files are pickles); resume=false starts over")


class Preempted(Exception):
    """The run was asked to stop (SIGTERM/SIGUSR1) and saved a checkpoint it resumes from."""

    def __init__(self, signum: int, step: int, path: Path):
        self.exit_code = 128 + signum
        super().__init__(f"{signal.Signals(signum).name} at step {step}: checkpoint saved in {path}; "
                         f"rerun with hydra.run.dir={path.parents[1]} to continue")


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()} or {prefix: {}}


def write_verified(directory: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` on every rank into a temporary sibling of `directory`, add the manifest of what
    it wrote, and rename it to `directory` once every rank is done: a process killed on the way leaves
    no directory that a reader would take for complete, and a failed write (a full disk) no debris."""
    directory = Path(directory)
    tmp = directory.parent / f".{directory.name}.tmp"
    is_main = distributed_context().is_main
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        write(tmp)
        barrier()
        if is_main:
            atomic_write_json(tmp / _MANIFEST, {"sha256": file_digests(tmp)})
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if is_main:
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    barrier()
    return directory


def save_engine_state(engine, directory: Path, tag: str) -> Path:
    """`engine`'s weights, optimiser state and lr-schedule position (DeepSpeed's checkpoint, collective)
    in `directory`, for a later run to go on from (`load_engine_state`): the next round of a game that
    one lr schedule and one optimiser span."""
    return write_verified(directory, lambda tmp: engine.save_checkpoint(str(tmp), tag=tag, save_latest=False))


def load_engine_state(engine, directory: Path, tag: str, key: str) -> None:
    """Load what `save_engine_state` saved into `engine` (same model, same ranks): its weights, its
    optimiser's moments and its lr scheduler's step. `key` names the setting that pointed here."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PbkdError(f"{key}: no saved engine state in {directory}")
    verify_manifest(directory)
    loaded, _ = engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise PbkdError(f"{key}: {directory} holds no '{tag}' engine state")


class Checkpoints:
    """Save every `every` steps (0: only when pre-empted), keep the newest `keep`, resume from the newest.

    `engines` maps a name to a DeepSpeed engine; the loop's own state is a JSON-able dict the loop
    builds (`state()`), handed back by `restore`.
    """

    def __init__(self, directory: Path, engines: dict[str, Any], *, every: int, keep: int, resume: bool,
                 config: dict, on_restore: Callable[[int], None] = lambda step: None):
        self.dir = Path(directory)
        self.engines = engines
        self.every, self.keep, self.resume = every, max(1, keep), resume
        self.config = config
        self.on_restore = on_restore
        self.rank = distributed_context().rank
        self.is_main = distributed_context().is_main
        self._signal: int | None = None
        self._previous_handlers = {}
        for signum in _SIGNALS:
            try:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: the launcher's default handling stays
                pass

    def _on_signal(self, signum, frame) -> None:
        log.warning("received %s: saving a checkpoint after this step", signal.Signals(signum).name)
        self._signal = signum

    def close(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------------------------

    def latest(self) -> tuple[int, Path] | None:
        marker = self.dir / _LATEST
        if not marker.is_file():
            return None
        latest = json.loads(marker.read_text())
        if not re.fullmatch(r"step-\d{6}", str(latest.get("dir"))):
            raise PbkdError(f"{marker}: 'dir' is {latest.get('dir')!r}, not a step directory of this run")
        return latest["step"], self.dir / latest["dir"]

    def restore(self) -> dict[str, Any]:
        """Load the newest checkpoint into the engines and the RNGs; its loop state, or {} for a fresh run.

        Call it after everything that draws random numbers before the loop (model init, teacher
        samples), so that the loop continues from exactly the saved RNG state.
        """
        found = self.latest()
        if found is None:
            return {}
        step, path = found
        if not self.resume:
            log.warning("resume=false: starting over, deleting the checkpoints in %s", self.dir)
            barrier()
            if self.is_main:
                shutil.rmtree(self.dir)
            barrier()
            return {}
        verify_manifest(path)
        for name, engine in self.engines.items():
            loaded, _ = engine.load_checkpoint(str(path), tag=name, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
            if loaded is None:
                raise PbkdError(f"checkpoint {path}: no '{name}' engine state in it")
        rng_file = path / f"rng-rank{self.rank}.pt"
        if not rng_file.is_file():
            raise PbkdError(f"checkpoint {path}: no {rng_file.name} (was it saved with another number of ranks?)")
        set_rng_state(torch.load(rng_file, weights_only=True))
        saved = json.loads((path / "state.json").read_text())
        changed = sorted(k for k, v in _flatten(self.config).items() if _flatten(saved["config"]).get(k) != v)
        if changed:
            log.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(changed))
        log.info("resuming from %s (step %d)", path, step)
        self.on_restore(step)
        return saved["loop"]

    # -- writing -----------------------------------------------------------------------------------

    def step_done(self, step: int, state: Callable[[], dict[str, Any]]) -> None:
        """End of `step`: save when it is due or a stop was asked for; then stop if asked."""
        stop = any_rank(self._signal is not None)
        if stop or (self.every and step % self.every == 0):
            path = self.save(step, state())
            if stop:
                raise Preempted(self._signal or signal.SIGTERM, step, path)

    def save(self, step: int, loop_state: dict[str, Any]) -> Path:
        name = f"step-{step:06d}"

        def write(tmp: Path) -> None:
            for engine_name, engine in self.engines.items():
                # Collective: every rank writes its own shard of the weights and optimiser state.
                engine.save_checkpoint(str(tmp), tag=engine_name, save_latest=False)
            torch.save(rng_state(), tmp / f"rng-rank{self.rank}.pt")
            barrier()
            if self.is_main:
                atomic_write_json(tmp / "state.json", {"step": step, "loop": loop_state, "config": self.config})

        final = write_verified(self.dir / name, write)
        if self.is_main:
            atomic_write_json(self.dir / _LATEST, {"step": step, "dir": name})
            self._prune(keep=name)
        barrier()
        log.info("checkpoint: step %d saved in %s", step, final)
        return final

    def _prune(self, keep: str) -> None:
        steps = sorted(p for p in self.dir.glob("step-*") if p.is_dir())
        for old in [p for p in steps if p.name != keep][: max(0, len(steps) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    # -- faults ------------------------------------------------------------------------------------

    def require_finite(self, value: float, step: int, what: str = "loss") -> None:
        """Stop (on every rank) before a non-finite loss reaches the weights, keeping the checkpoints."""
        if not any_rank(not math.isfinite(value)):
            return
        found = self.latest()
        kept = (f"the checkpoint of step {found[0]} is kept in {found[1]}" if found else
                "no checkpoint was saved yet (trainer.checkpoint_every)")
        raise PbkdError(f"{what} is not finite ({value}) at step {step}; stopped before the update, {kept}")
