"""Composition and schema validation: every bad config fails before any work, naming its key."""

import re
from pathlib import Path

import pytest

from pbkd_cli.config.compose import ConfigError, compose, plan_jobs, to_typed, with_stage_overrides
from pbkd_cli.config.schema import RANGES, STAGE_NAMES, PbkdConfig, ResponseSource, out_of_range
from pbkd_cli.runner import STAGES


def typed(*overrides: str) -> PbkdConfig:
    return to_typed(compose(["stage=sft", *overrides]))


def test_default_config_is_valid_and_typed():
    cfg = typed()
    assert isinstance(cfg, PbkdConfig) and cfg.stage == "sft"
    assert cfg.sft.source is ResponseSource.gold
    assert cfg.model.teacher.tiny.hidden_size > cfg.model.student.tiny.hidden_size
    assert cfg.deepspeed["zero_optimization"]["stage"] == 0


CONF = Path(__file__).resolve().parents[2] / "conf"
GROUP_OPTIONS = sorted((str(f.parent.relative_to(CONF)), f.stem) for f in CONF.rglob("*.yaml")
                       if f.parent != CONF and f.parent.parts[-1] not in ("exp", "launcher"))


@pytest.mark.parametrize("group, option", GROUP_OPTIONS)
def test_every_option_of_every_config_group_composes_and_validates(group, option):
    assert isinstance(typed(f"{group}={option}"), PbkdConfig)


@pytest.mark.parametrize("exp", sorted(f.stem for f in (CONF / "exp").glob("*.yaml")))
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_experiment_composes_and_validates_for_every_stage(exp, stage):
    # As `pbkd <stage> +exp=<exp>` composes it: the experiment's stage_overrides[<stage>] first.
    cfg = to_typed(compose(with_stage_overrides(stage, [f"+exp={exp}"])))
    assert cfg.stage == stage


def test_stage_overrides_for_a_step_that_does_not_exist_are_one_line():
    with pytest.raises(ConfigError, match=r"^stage_overrides.vanila_kd: no stage or pipeline step has this name"):
        typed('+stage_overrides.vanila_kd=["trainer.max_steps=1"]')


def test_the_schemas_stage_names_are_the_runners():
    assert set(STAGE_NAMES) == set(STAGES)


def test_every_zero_stage_reaches_deepspeed():
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


def test_every_range_names_a_schema_key_and_the_defaults_lie_inside():
    assert out_of_range(PbkdConfig(stage="sft")) is None  # walks every key: a stale one raises here
    for exp in ("demo", "gsm8k"):
        for stage in ("sft", "collect_prefs", "train_rm", "dpo", "minmax", "online", "eval", "pipeline"):
            to_typed(compose(with_stage_overrides(stage, [f"+exp={exp}"])))
    assert "trainer.micro_batch_size" in RANGES and "train_rm.heldout_fraction" in RANGES


@pytest.mark.parametrize("override, message", [
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size=0: must be >= 1"),
    ("trainer.grad_accum=-2", "trainer.grad_accum=-2: must be >= 1"),
    ("trainer.max_steps=0", "trainer.max_steps=0: must be >= 1"),
    ("trainer.lr=-1e-3", "trainer.lr=-0.001: must be >= 0"),
    ("trainer.warmup_ratio=1", "trainer.warmup_ratio=1.0: must be >= 0 and < 1"),
    ("train_rm.heldout_fraction=1", "train_rm.heldout_fraction=1.0: must be >= 0 and < 1"),
    ("generation.top_p=0", "generation.top_p=0.0: must be > 0 and <= 1"),
    ("collect_prefs.chunk_prompts=0", "collect_prefs.chunk_prompts=0: must be >= 1"),
    ("minmax.iterations=0", "minmax.iterations=0: must be >= 1"),
    ("minmax.temperature=0", "minmax.temperature=0.0: must be > 0"),
    ("sft.kd.chunk_size=-1", "sft.kd.chunk_size=-1: must be >= 1"),
])
def test_values_out_of_range_are_one_line_before_any_job(override, message):
    with pytest.raises(ConfigError) as err:
        plan_jobs("sft", ["+exp=demo", override], multirun=False)
    assert str(err.value) == message


def test_a_sweep_with_one_point_out_of_range_is_refused_whole():
    with pytest.raises(ConfigError, match=r"^trainer.micro_batch_size=0: must be >= 1$"):
        plan_jobs("sft", ["trainer.micro_batch_size=8,0"], multirun=True)


def test_conf_config_yaml_states_the_schema_defaults():
    """One source of defaults: outside the sections config groups provide, conf/config.yaml composes to
    exactly the schema's defaults, so reading either tells the truth."""
    from pbkd_cli.runner import config_as_dict

    composed = config_as_dict(typed())
    defaults = config_as_dict(PbkdConfig(stage="sft"))
    for grouped in ("model", "data", "deepspeed", "eval"):
        composed.pop(grouped), defaults.pop(grouped)
    assert composed == defaults


@pytest.mark.parametrize("key", ["train_path", "test_path"])
def test_a_local_data_file_the_task_would_ignore_is_one_line(key):
    with pytest.raises(ConfigError) as err:
        plan_jobs("sft", [f"data.{key}=/data/gsm8k/{key}.jsonl"], multirun=False)
    assert str(err.value) == (f"data.{key}=/data/gsm8k/{key}.jsonl: data.task=arithmetic generates its examples "
                              "and reads no file (set data=gsm8k, or data.task=custom for prompt/completion rows)")
    assert getattr(typed("data=gsm8k", f"data.{key}=/data/gsm8k/{key}.jsonl").data, key) == f"/data/gsm8k/{key}.jsonl"


@pytest.mark.parametrize("override, message", [
    ("model.student.tiny.hidden_size=98", "model.student.tiny.hidden_size=98: must be a multiple of "
                                           "model.student.tiny.num_attention_heads=4"),
    ("model.teacher.tiny.num_key_value_heads=4", "model.teacher.tiny.num_attention_heads=6: must be a multiple of "
                                                 "model.teacher.tiny.num_key_value_heads=4"),
    ("model.rm.tiny.num_hidden_layers=0", "model.rm.tiny.num_hidden_layers=0: must be >= 1"),
])
def test_a_tiny_architecture_that_cannot_be_built_is_one_line_before_any_model_loads(override, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        plan_jobs("sft", ["+exp=demo", override], multirun=False)


def test_two_processes_started_in_the_same_second_get_their_own_default_run_directories():
    import subprocess
    import sys

    from omegaconf import OmegaConf

    from pbkd_cli.config.compose import CONF_DIR

    # The default run directory is the second it started plus a tag drawn once per process.
    hydra_run = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"))["hydra"]["run"]["dir"]
    assert hydra_run.endswith("${now:%Y-%m-%d_%H-%M-%S}_${pbkd_run_id:}")
    tag = "from omegaconf import OmegaConf; import pbkd_cli.config.compose; print(OmegaConf.create({'t': '${pbkd_run_id:}'}).t)"
    tags = [subprocess.run([sys.executable, "-c", tag], capture_output=True, text=True, check=True).stdout.strip()
            for _ in range(2)]
    assert len(tags[0]) == 6 and tags[0] != tags[1]
