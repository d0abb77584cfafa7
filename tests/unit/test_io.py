import pytest

from pbkd_cli.io import PbkdError, path_component


@pytest.mark.parametrize("name", ["task", "gsm8k", "PbKD_offline", "model-1.5b", "v2.final"])
def test_plain_names_pass(name):
    assert path_component(name, "eval.models.x") == name


@pytest.mark.parametrize("name", ["../up", "a/b", "/abs", "..", ".hidden", "a..b", "", "sp ace", "nl\\n"])
def test_names_that_could_leave_or_hide_in_the_run_directory_are_one_line(name):
    with pytest.raises(PbkdError, match=r"^eval\.benchmarks\.x: .* is not a plain name") as err:
        path_component(name, "eval.benchmarks.x")
    assert "\n" not in str(err.value)
