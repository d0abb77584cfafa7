"""Loading a model or tokenizer from a path that holds none: one line naming the key, no traceback."""

import pytest

from pbkd_cli.config.schema import ModelConfig, TokenizerConfig
from pbkd_cli.io import PbkdError
from pbkd_cli.models.factory import load_causal_lm, load_tokenizer


def test_a_path_that_is_missing_a_file_or_not_a_model_is_one_line(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not a model")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(tmp_path / "missing", "no such file or directory"), (weights, "a file, not a model directory"),
             (empty, "no tokenizer there")]
    for path, reason in cases:
        with pytest.raises(PbkdError) as err:
            load_tokenizer(ModelConfig(name_or_path=str(path)), "model.student", TokenizerConfig(), lambda: [])
        assert str(err.value).startswith(f"model.student.name_or_path={path}: {reason}")
        assert "\n" not in str(err.value)
    with pytest.raises(PbkdError, match=rf"^model.teacher.name_or_path={empty}: "):
        load_causal_lm(ModelConfig(name_or_path=str(empty)), None, "model.teacher")


@pytest.mark.parametrize("missing", ["gguf", "accelerate"])
def test_a_gguf_file_without_its_packages_is_one_line_naming_the_extra(tmp_path, monkeypatch, missing):
    import sys
    import types

    from pbkd_cli.config.schema import RewardPooling
    from pbkd_cli.models.factory import GGUF_PACKAGES
    from pbkd_cli.models.reward import load_reward_model

    # `import <missing>` raises ImportError and the other package imports, whatever this venv holds.
    for package in GGUF_PACKAGES:
        monkeypatch.setitem(sys.modules, package, None if package == missing else types.ModuleType(package))
    cfg = ModelConfig(name_or_path=str(tmp_path), gguf_file="qwen2.5-0.5b-q8_0.gguf")
    expected = (f"model.student.gguf_file=qwen2.5-0.5b-q8_0.gguf: reading GGUF needs the '{missing}' package: "
                "pip install 'pbkd-cli[gguf]'")
    loads = [lambda: load_tokenizer(cfg, "model.student", TokenizerConfig(), lambda: []),
             lambda: load_causal_lm(cfg, None, "model.student"),
             lambda: load_reward_model(cfg, None, RewardPooling.last, key="model.student")]
    for load in loads:
        with pytest.raises(PbkdError) as err:
            load()
        assert str(err.value) == expected
