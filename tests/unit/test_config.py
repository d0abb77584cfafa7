"""Composition and schema validation: every bad config fails before any work, naming its key."""

import pytest

from pbkd_cli.config.compose import ConfigError, compose, plan_jobs, to_typed, with_stage_overrides
from pbkd_cli.config.schema import PbkdConfig, ResponseSource


def typed(*overrides: str) -> PbkdConfig:
    return to_typed(compose(["stage=sft", *overrides]))


def test_default_config_is_valid_and_typed():
    cfg = typed()
    assert isinstance(cfg, PbkdConfig) and cfg.stage == "sft"
    assert cfg.sft.source is ResponseSource.gold
    assert cfg.model.teacher.tiny.hidden_size > cfg.model.student.tiny.hidden_size
    assert cfg.deepspeed["zero_optimization"]["stage"] == 0


def test_every_experiment_and_group_option_composes():
    for exp in ("demo", "gsm8k"):
        assert to_typed(compose(["stage=sft", f"+exp={exp}"])).stage == "sft"
    for stage in (0, 1, 2, 3):
        assert typed(f"deepspeed=zero{stage}").deepspeed["zero_optimization"]["stage"] == stage


@pytest.mark.parametrize("override, key", [
    ("trainer.lr=oops", "trainer.lr"),
    ("trainer.max_steps=1.5", "trainer.max_steps"),
    ("no_such_key=1", "no_such_key"),
    ("+no_such_key=1", "no_such_key"),
    ("+model.student.width=3", "model.student.width"),
    ("sft.source=oracle", "sft.source"),
    ("logger.mode=sometimes", "logger.mode"),
    ("model.student.dtype=float8", "model.student.dtype"),
])
def test_bad_override_names_its_key_in_one_line(override, key):
    with pytest.raises(ConfigError) as err:
        plan_jobs("sft", [override], multirun=False)
    message = str(err.value)
    assert message.startswith(key) and "\n" not in message


def test_unknown_group_option_lists_the_choices():
    with pytest.raises(ConfigError, match="data/nope.*arithmetic"):
        plan_jobs("sft", ["data=nope"], multirun=False)


def test_missing_mandatory_value_is_reported():
    with pytest.raises(ConfigError, match="stage"):
        to_typed(compose([]))


def test_deepspeed_section_is_free_form():
    assert typed("+deepspeed.zero_optimization.overlap_comm=true").deepspeed["zero_optimization"]["overlap_comm"]


def test_sweeps_need_multirun_and_every_job_is_checked():
    with pytest.raises(ConfigError, match="multirun"):
        plan_jobs("sft", ["seed=1,2"], multirun=False)
    assert plan_jobs("sft", ["seed=1,2"], multirun=True)[-1] == "seed=1,2"
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        plan_jobs("sft", ["trainer.max_steps=10,ten"], multirun=True)


def test_stage_overrides_apply_below_the_users_own():
    planned = with_stage_overrides("sft", ["+exp=demo"], step="teacher")
    demo_teacher = [o for o in planned if o.startswith("trainer.max_steps=")]
    assert demo_teacher, planned
    user_wins = with_stage_overrides("sft", ["+exp=demo", "trainer.max_steps=7"], step="teacher")
    assert to_typed(compose(user_wins)).trainer.max_steps == 7
