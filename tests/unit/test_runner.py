import pytest
from omegaconf import OmegaConf

from pbkd_cli.io import PbkdError
from pbkd_cli.runner import check_run_dir, first_difference


def test_first_difference_names_the_first_differing_key_and_skips_logging_and_checkpointing():
    old = {"seed": 0, "resume": True, "trainer": {"lr": 1e-3, "log_every": 10}, "logger": {"mode": "offline"}}
    assert first_difference(old, old) is None
    assert first_difference(old, {**old, "resume": False, "logger": {"mode": "online"},
                                  "trainer": {"lr": 1e-3, "log_every": 5}}) is None
    assert first_difference(old, {**old, "trainer": {"lr": 2e-3, "log_every": 10}}) == "trainer.lr"
    assert first_difference(old, {**old, "added_by_a_newer_schema": 1}) is None
    assert first_difference(old, {**old, "seed": 1}) == "seed"
    rows = {"pipeline": {"controls": False, "baselines": False, "train_teacher": True}}
    assert first_difference(rows, {"pipeline": {"controls": True, "baselines": True, "train_teacher": True}}) is None
    assert first_difference(rows, {"pipeline": {**rows["pipeline"], "train_teacher": False}}) == "pipeline.train_teacher"


def test_a_directory_holding_another_run_is_refused_in_one_line(tmp_path):
    saved = {"stage": "sft", "sft": {"model": "teacher"}, "seed": 0}
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    check_run_dir(tmp_path, {**saved, "seed": 1})  # a run that failed before any result: free to reuse
    (tmp_path / "summary.json").write_text("{}")
    check_run_dir(tmp_path, saved)  # the same run again: resume
    check_run_dir(tmp_path / "fresh", {"stage": "eval"})
    with pytest.raises(PbkdError) as err:
        check_run_dir(tmp_path, {**saved, "sft": {"model": "student"}})
    assert str(err.value) == (f"hydra.run.dir={tmp_path}: holds a run with sft.model=teacher, this one has "
                              "sft.model=student; give it its own directory")
    (tmp_path / "file").write_text("x")
    with pytest.raises(PbkdError, match="is a file"):
        check_run_dir(tmp_path / "file", saved)
