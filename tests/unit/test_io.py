import os
import stat

import pytest

from pbkd_cli import io
from pbkd_cli.data.examples import DataError
from pbkd_cli.data.gsm8k import load_gsm8k
from pbkd_cli.io import (PbkdError, atomic_directory, atomic_write_text, numbered_jsonl, numbered_lines, path_component,
                         read_jsonl)


@pytest.mark.parametrize("name", ["task", "gsm8k", "PbKD_offline", "model-1.5b", "v2.final"])
def test_plain_names_pass(name):
    assert path_component(name, "eval.models.x") == name


@pytest.mark.parametrize("name", ["../up", "a/b", "/abs", "..", ".hidden", "a..b", "", "sp ace", "nl\\n"])
def test_names_that_could_leave_or_hide_in_the_run_directory_are_one_line(name):
    with pytest.raises(PbkdError, match=r"^eval\.benchmarks\.x: .* is not a plain name") as err:
        path_component(name, "eval.benchmarks.x")
    assert "\n" not in str(err.value)


# -- UTF-8 and bounded lines ---------------------------------------------------------------------

def test_invalid_utf8_names_the_file_and_line_and_is_never_replaced(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(b'{"a": "ok"}\n{"a": "caf\xe9"}\n')
    with pytest.raises(PbkdError, match=rf"^train_rm.prefs_path={path} line 2: not valid UTF-8 \(byte 11 ") as err:
        read_jsonl(path, "train_rm.prefs_path")
    assert "\n" not in str(err.value)
    # What the report reads leniently (torn metric rows) still stops at bytes it cannot decode.
    with pytest.raises(PbkdError, match="line 2: not valid UTF-8"):
        list(numbered_jsonl(path, on_bad_line=lambda problem: None))


def test_task_data_with_invalid_utf8_is_a_data_error_naming_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"question": "q", "answer": "#### 1"}\n{"question": "\xff", "answer": "#### 2"}\n')
    with pytest.raises(DataError, match=rf"^data.train_path={path} line 2: not valid UTF-8"):
        load_gsm8k("train", path=str(path), path_key="data.train_path")


def test_a_line_over_the_bound_is_refused_before_it_is_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "MAX_LINE_BYTES", 64)
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": 1}\n' + '{"a": "' + "x" * 200 + '"}\n' + '{"a": 3}\n')
    seen = []
    with pytest.raises(PbkdError, match=rf"^data.path={path} line 2: longer than"):
        for number, _ in numbered_lines(path, "data.path"):
            seen.append(number)
    assert seen == [1]


def test_a_line_at_the_bound_and_a_last_line_without_newline_are_read(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "MAX_LINE_BYTES", 10)
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"a": 12}\n{"a": 3}')                     # 10 bytes with its newline; no final newline
    assert read_jsonl(path) == [{"a": 12}, {"a": 3}]


# -- permissions -----------------------------------------------------------------------------------

@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                        (0o002, 0o664, 0o775)])
def test_artefacts_get_the_modes_the_umask_gives(tmp_path, monkeypatch, umask, file_mode, dir_mode):
    monkeypatch.setattr(io, "_UMASK", umask)
    atomic_write_text(tmp_path / "summary.json", "{}")
    with atomic_directory(tmp_path / "model") as tmp:
        (tmp / "weights").write_text("w")
    assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == dir_mode


def test_the_umask_is_read_without_changing_it():
    before = os.umask(0o027)
    try:
        assert io._read_umask() == 0o027 and os.umask(0o027) == 0o027
    finally:
        os.umask(before)
