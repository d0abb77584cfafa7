"""The plumbing of scale-out and faults: batch arithmetic, checkpoints, data position, atomic writes."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pbkd_cli.cli import _shared_run_dir, one_line_exit, require_creatable_run_dir
from pbkd_cli.config.compose import ConfigError
from pbkd_cli.config.schema import LoggerConfig, TrainerConfig, WandbMode
from pbkd_cli.engine.checkpoint import Checkpoints, Preempted
from pbkd_cli.engine.deepspeed_engine import deepspeed_config
from pbkd_cli.engine.distributed import gather, reduce_metrics, shard
from pbkd_cli.io import PbkdError, atomic_directory, atomic_write_text
from pbkd_cli.data.minibatches import Minibatches
from pbkd_cli.tracking import Tracker


# -- batch arithmetic ----------------------------------------------------------------------------

def test_global_batch_is_micro_times_accumulation_times_world():
    trainer = TrainerConfig(micro_batch_size=4, grad_accum=3, global_batch_size=24)
    config = deepspeed_config({"zero_optimization": {"stage": 2}}, trainer, world_size=2)
    assert config["train_batch_size"] == 24
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 3
    assert config["zero_optimization"] == {"stage": 2}


@pytest.mark.parametrize("ds, trainer, message", [
    ({}, TrainerConfig(micro_batch_size=4, grad_accum=3, global_batch_size=12),
     "trainer.global_batch_size=12: micro_batch_size 4 x grad_accum 3 x 2 ranks = 24"),
    ({"train_batch_size": 64}, TrainerConfig(), "deepspeed.train_batch_size: set the batch through trainer"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, TrainerConfig(),
     "deepspeed.fp16.enabled: bf16 and fp16 cannot both be enabled"),
])
def test_inconsistent_batch_or_precision_is_one_line(ds, trainer, message):
    with pytest.raises(PbkdError) as err:
        deepspeed_config(ds, trainer, world_size=2)
    assert str(err.value).startswith(message)


def test_a_zero3_frozen_model_is_partitioned_and_gives_the_logits_of_the_whole_model():
    import copy

    from pbkd_cli.engine import build_frozen_engine
    from tests.unit.tiny import tiny_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_lm(tokenizer)
    whole = copy.deepcopy(model).eval()
    engine = build_frozen_engine(model, {"zero_optimization": {"stage": 3}})
    # Each parameter's data lives in its ZeRO-3 partition; the module holds placeholders.
    assert engine.zero_optimization_partition_weights()
    assert all(p.numel() == 0 and p.ds_numel > 0 for p in engine.module.parameters())
    ids = torch.tensor([tokenizer("1 + 2 = 3")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(engine(input_ids=ids).logits, whole(input_ids=ids).logits, atol=1e-5)


# -- checkpoints ---------------------------------------------------------------------------------

def test_an_engine_state_saved_for_a_later_round_goes_on_with_its_moments_and_lr_schedule(tmp_path):
    """What online PbKD's rounds rely on: the next round's engine, built afresh from the saved model,
    continues exactly where the last one stopped (same next update), not from a fresh AdamW and warm-up."""
    import copy

    from pbkd_cli.engine import build_engine
    from pbkd_cli.engine.checkpoint import load_engine_state, save_engine_state
    from tests.unit.tiny import tiny_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_lm(tokenizer)
    untrained = copy.deepcopy(model)
    trainer = TrainerConfig(lr=1e-2, max_steps=10, warmup_ratio=0.3, micro_batch_size=1)
    ds = {"zero_optimization": {"stage": 0}}
    ids = torch.tensor([tokenizer("1 + 2 = 3")["input_ids"]])

    def update(engine):
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()

    first = build_engine(model, trainer, ds)
    for _ in range(4):
        update(first)
    save_engine_state(first, tmp_path / "student_state", "policy")
    assert (tmp_path / "student_state" / "manifest.json").is_file() and not list(tmp_path.glob(".*tmp"))
    fresh = build_engine(untrained, trainer, ds)
    assert fresh.get_lr() != first.get_lr()  # a fresh engine is back at the start of the warm-up
    load_engine_state(fresh, tmp_path / "student_state", "policy", "minmax.continue_from")
    assert fresh.global_steps == 4 and fresh.get_lr() == first.get_lr()
    moments = [first.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]]
    assert moments[0].keys() == moments[1].keys()
    assert all(torch.equal(moments[0][k]["exp_avg_sq"], moments[1][k]["exp_avg_sq"]) for k in moments[0])
    update(first), update(fresh)
    assert all(torch.equal(a, b) for a, b in zip(first.module.parameters(), fresh.module.parameters()))

    with pytest.raises(PbkdError, match="minmax.continue_from: no saved engine state"):
        load_engine_state(fresh, tmp_path / "elsewhere", "policy", "minmax.continue_from")
    pickle = next(p for p in (tmp_path / "student_state").rglob("*.pt"))
    pickle.write_bytes(pickle.read_bytes() + b"x")
    with pytest.raises(PbkdError, match="differs from the file that was saved"):
        load_engine_state(fresh, tmp_path / "student_state", "policy", "minmax.continue_from")


class FakeEngine:
    """What `Checkpoints` asks of a DeepSpeed engine: save and load under a tag."""

    def __init__(self):
        self.weight = torch.zeros(3)

    def save_checkpoint(self, save_dir, tag, save_latest):
        Path(save_dir, tag).mkdir()
        torch.save(self.weight, Path(save_dir, tag, "weight.pt"))

    def load_checkpoint(self, load_dir, tag, **_):
        path = Path(load_dir, tag, "weight.pt")
        if not path.exists():
            return None, None
        self.weight = torch.load(path)
        return str(path), {}


def checkpoints(directory, engine, **kw):
    options = dict(every=2, keep=2, resume=True, config={"trainer": {"lr": 1.0}})
    return Checkpoints(directory, {"policy": engine}, **{**options, **kw})


def test_checkpoints_keep_the_newest_and_restore_weights_rng_and_loop_state(tmp_path):
    engine = FakeEngine()
    saver = checkpoints(tmp_path, engine)
    for step in range(1, 7):
        engine.weight += 1
        saver.step_done(step, lambda: {"step": step, "data": [step]})
    saver.close()
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000004", "step-000006"]
    assert json.loads((tmp_path / "latest.json").read_text()) == {"step": 6, "dir": "step-000006"}
    expected = (torch.rand(2), np.random.rand(), random.random())  # drawn right after the save at step 6

    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    fresh = FakeEngine()
    rewound = []
    loop = checkpoints(tmp_path, fresh, on_restore=rewound.append).restore()
    assert loop == {"step": 6, "data": [6]} and rewound == [6]
    assert torch.equal(fresh.weight, torch.full((3,), 6.0))
    drawn = (torch.rand(2), np.random.rand(), random.random())
    assert torch.equal(drawn[0], expected[0]) and drawn[1:] == expected[1:]


def test_a_fresh_directory_restores_nothing_and_resume_false_deletes(tmp_path):
    engine = FakeEngine()
    assert checkpoints(tmp_path / "none", engine).restore() == {}
    saver = checkpoints(tmp_path, engine)
    saver.save(2, {"step": 2})
    assert checkpoints(tmp_path, engine, resume=False).restore() == {}
    assert not tmp_path.exists()


def test_an_unfinished_save_leaves_the_previous_checkpoint_in_charge(tmp_path):
    engine = FakeEngine()
    checkpoints(tmp_path, engine).save(2, {"step": 2})
    (tmp_path / ".step-000004.tmp").mkdir()  # a save killed midway
    assert checkpoints(tmp_path, FakeEngine()).restore() == {"step": 2}


def test_a_save_that_fails_on_a_full_disk_leaves_no_debris_and_the_previous_checkpoint(tmp_path):
    class FullDisk(FakeEngine):
        def save_checkpoint(self, save_dir, tag, save_latest):
            Path(save_dir, tag).mkdir()
            Path(save_dir, tag, "half.pt").write_bytes(b"x")
            # What safetensors raises when the disk fills up: not an OSError.
            raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                               'message: "No space left on device" })')

    checkpoints(tmp_path, FakeEngine()).save(2, {"step": 2})
    with pytest.raises(RuntimeError) as err:
        checkpoints(tmp_path, FullDisk()).save(4, {"step": 4})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-000002"]
    assert one_line_exit(err.value) == (2, "error: no space left on the device writing an artefact")


@pytest.mark.parametrize("tamper, message", [
    (lambda step: (step / "policy" / "weight.pt").write_bytes(b"cos\nsystem\n(S'touch pwned'\ntR."),
     "policy/weight.pt differs from the file that was saved"),
    (lambda step: (step / "policy" / "extra.pt").write_bytes(b"x"), "policy/extra.pt was not in it when it was saved"),
    (lambda step: (step / "rng-rank0.pt").unlink(), "rng-rank0.pt is missing"),
    (lambda step: (step / "manifest.json").unlink(), "no manifest.json to check its files against"),
])
def test_a_tampered_checkpoint_is_refused_before_anything_is_unpickled(tmp_path, tamper, message):
    class Watched(FakeEngine):
        def load_checkpoint(self, load_dir, tag, **_):
            raise AssertionError("unpickled a checkpoint that failed its check")

    checkpoints(tmp_path, FakeEngine()).save(2, {"step": 2})
    tamper(tmp_path / "step-000002")
    with pytest.raises(PbkdError, match=f"^checkpoint {tmp_path / 'step-000002'}: {message}") as err:
        checkpoints(tmp_path, Watched()).restore()
    assert "\n" not in str(err.value) and "resume=false starts over" in str(err.value)


def test_latest_cannot_point_outside_the_run(tmp_path):
    checkpoints(tmp_path, FakeEngine()).save(2, {"step": 2})
    (tmp_path / "latest.json").write_text(json.dumps({"step": 2, "dir": "../elsewhere"}))
    with pytest.raises(PbkdError, match="'dir' is '../elsewhere', not a step directory"):
        checkpoints(tmp_path, FakeEngine()).restore()


def test_a_stop_signal_saves_at_the_end_of_the_step_and_raises(tmp_path):
    engine = FakeEngine()
    saver = checkpoints(tmp_path, engine, every=0)
    saver.step_done(1, lambda: {"step": 1})
    assert not tmp_path.joinpath("latest.json").exists()
    os.kill(os.getpid(), 15)  # SIGTERM, caught by the handler the checkpoints installed
    with pytest.raises(Preempted) as stop:
        saver.step_done(2, lambda: {"step": 2})
    saver.close()
    assert stop.value.exit_code == 128 + 15
    assert str(stop.value).startswith("SIGTERM at step 2: checkpoint saved in")
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 2


def test_a_non_finite_loss_names_the_step_and_the_kept_checkpoint(tmp_path):
    saver = checkpoints(tmp_path, FakeEngine())
    saver.require_finite(1.5, 3)
    saver.save(2, {"step": 2})
    with pytest.raises(PbkdError) as err:
        saver.require_finite(float("inf"), 3, "policy loss")
    saver.close()
    assert str(err.value) == (f"policy loss is not finite (inf) at step 3; stopped before the update, "
                              f"the checkpoint of step 2 is kept in {tmp_path / 'step-000002'}")


# -- data position and collectives (one process: identities) -------------------------------------

def test_minibatches_continue_from_their_saved_position():
    batches = Minibatches(10, 3, seed=7)
    seen = [next(batches) for _ in range(5)]  # crosses an epoch boundary (3 batches per epoch)
    state = batches.state_dict()
    expected = [next(batches) for _ in range(4)]
    resumed = Minibatches(10, 3, seed=7)
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(4)] == expected
    assert all(len(b) == 3 for b in seen)


def test_minibatches_larger_than_the_data_are_one_line():
    with pytest.raises(PbkdError, match=r"trainer.micro_batch_size=8 exceeds the 5 examples per rank"):
        next(Minibatches(5, 8, seed=0))


def test_single_process_collectives_are_identities():
    metrics = {"loss": 1.5, "tokens_per_second": 10.0, "name": "x"}
    assert reduce_metrics(metrics) == metrics
    assert shard([1, 2, 3]) == [1, 2, 3] and gather([1, 2, 3], 3) == [1, 2, 3]


# -- one run directory for all ranks -------------------------------------------------------------

def test_ranks_of_one_launch_share_a_run_directory(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert _shared_run_dir("sft", ["a=1"], False) == ["a=1", "hydra.run.dir=outputs/sft/run-abc"]
    assert _shared_run_dir("sft", ["hydra.run.dir=x"], False) == ["hydra.run.dir=x"]
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert _shared_run_dir("sft", [], False) == ["hydra.run.dir=outputs/sft/slurm-42"]
    monkeypatch.delenv("SLURM_JOB_ID")
    with pytest.raises(ConfigError, match="hydra.run.dir: 2 processes need one run directory"):
        _shared_run_dir("sft", [], False)


# -- disk full -----------------------------------------------------------------------------------

def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text("old")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError) as err:
        atomic_write_text(target, "new")
    assert err.value.errno == errno.ENOSPC
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_full_disk_while_saving_a_model_directory_leaves_the_old_one(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights").write_text("old")
    with pytest.raises(OSError):
        with atomic_directory(model) as tmp:
            (tmp / "weights").write_text("half")
            disk_full()
    assert (model / "weights").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_user_facing_failures_become_one_line_and_bugs_do_not():
    assert one_line_exit(OSError(errno.ENOSPC, "No space left on device", "/run/model.safetensors")) == (
        2, "error: no space left on the device writing /run/model.safetensors")
    assert one_line_exit(PbkdError("data: the train split is empty")) == (2, "error: data: the train split is empty")
    assert one_line_exit(OSError(errno.EACCES, "Permission denied")) is None
    assert one_line_exit(PermissionError(errno.EACCES, "Permission denied", "/shared/run/model")) == (
        2, "error: Permission denied: /shared/run/model")
    assert one_line_exit(OSError(errno.EROFS, "Read-only file system", "/ro/run")) == (
        2, "error: Read-only file system: /ro/run")
    wrapped = RuntimeError("PytorchStreamWriter failed writing file data/0")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded", "/run/ckpt/optim.pt")
    assert one_line_exit(wrapped) == (2, "error: no space left on the device writing /run/ckpt/optim.pt")
    assert one_line_exit(ValueError("a bug")) is None


# -- metrics after a resume ----------------------------------------------------------------------

def test_a_run_directory_that_cannot_be_made_is_one_line_before_anything_loads(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    require_creatable_run_dir([f"hydra.run.dir={tmp_path / 'new' / 'run'}"], multirun=False)      # made later: fine
    with pytest.raises(ConfigError, match=f"^hydra.run.dir={tmp_path / 'afile'}: is a file, not a directory$"):
        require_creatable_run_dir([f"hydra.run.dir={tmp_path / 'afile'}"], multirun=False)
    with pytest.raises(ConfigError, match=f"^hydra.sweep.dir=.*: {tmp_path / 'afile'} is a file, not a directory$"):
        require_creatable_run_dir([f"hydra.sweep.dir={tmp_path / 'afile' / 'sweep'}"], multirun=True)
    # Root writes anywhere, so the permission check is exercised through what os.access answers.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(ConfigError, match=f"cannot write in {tmp_path} \\(read-only or no permission\\)$"):
        require_creatable_run_dir([f"hydra.run.dir={tmp_path / 'run'}"], multirun=False)


def test_rewind_drops_the_rows_logged_after_the_checkpoint(tmp_path):
    tracker = Tracker(tmp_path, LoggerConfig(mode=WandbMode.disabled, progress_bars=False), {}, "t", is_main=True)
    for step in (2, 4, 6):
        tracker.log({"loss": float(step)}, step)
    tracker.rewind(4)
    tracker.log({"loss": 60.0}, 6)
    tracker.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(2, 2.0), (4, 4.0), (6, 60.0)]


def test_offline_wandb_run_is_continued_by_a_rerun_in_the_same_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    ids = []
    for _ in range(2):
        tracker = Tracker(tmp_path, LoggerConfig(mode=WandbMode.offline, progress_bars=False), {"seed": 0}, "t",
                          is_main=True)
        tracker.log({"loss": 1.0}, 1)
        ids.append(tracker._wandb.id)
        tracker.close()
    assert ids[0] == ids[1] == (tmp_path / "wandb_run_id").read_text().strip()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{ids[0]}"))


@pytest.mark.parametrize("supported", [True, False])
def test_auto_precision_is_bf16_only_where_the_device_computes_in_it(monkeypatch, supported):
    from pbkd_cli.config.schema import Dtype
    from pbkd_cli.engine import deepspeed_engine
    from pbkd_cli.models import factory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: supported)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    config = deepspeed_engine.deepspeed_config({"bf16": {"enabled": "auto"}}, TrainerConfig())
    assert config["bf16"] == {"enabled": supported}
    assert factory.torch_dtype(Dtype.auto) == (torch.bfloat16 if supported else torch.float32)
    assert factory.torch_dtype(Dtype.bfloat16) == torch.bfloat16      # an explicit dtype is kept
    assert deepspeed_engine.deepspeed_config({"bf16": {"enabled": True}}, TrainerConfig())["bf16"]["enabled"] is True


def test_a_plain_log_shows_progress_with_rate_and_eta_at_most_every_interval(monkeypatch, caplog):
    from pbkd_cli import tracking

    clock = iter([0.0, 10.0, 31.0, 40.0, 62.0, 70.0])          # start, then one reading per item
    monkeypatch.setattr(tracking.time, "monotonic", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="pbkd"):
        assert list(tracking.logged_progress(range(5), 5, "sft", every_s=30)) == [0, 1, 2, 3, 4]
    lines = [r.getMessage() for r in caplog.records]
    # Items 2 (31 s) and 4 (62 s) cross the interval; item 5 is the end.
    assert lines == ["sft: 2/5 (0.0645/s, ETA 46 s)", "sft: 4/5 (0.0645/s, ETA 16 s)", "sft: 5/5 (0.0714/s)"]
