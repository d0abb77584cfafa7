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
