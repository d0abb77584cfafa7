import json
import re
from pathlib import Path

import pytest

from pbkd_cli.data.examples import DataError, Example
from pbkd_cli.data.gsm8k import extract_answer, load_gsm8k, strip_calculator_annotations

REAL_TRAIN = Path("/work/shared/data/gsm8k/train.jsonl")
needs_real_train = pytest.mark.skipif(not REAL_TRAIN.is_file(), reason="no local copy of the GSM8K train split")


@pytest.mark.parametrize("text, expected", [
    ("#### 1,234", "1234"),
    ("The answer is $5.00.", "5"),
    ("-3", "-3"),
    ("no number", None),
    ("", None),
    ("#### 7 then 9", "7"),
    ("She had 3 apples, bought 4, and now has 7 apples in 2 bags.", "2"),
    ("#### 0.50", "0.5"),
    ("#### +12", "12"),
    ("It rose by 25%.", "25"),
    ("#### 100", "100"),
    ("#### 1,000,000", "1000000"),
    ("#### 007", "7"),
    ("#### -0.0", "0"),
    ("#### .5", "0.5"),
    ("costs $-4", "-4"),
    ("12 - 3 = 9", "9"),
    ("12-3", "3"),  # a binary minus is no sign
    ("3,4", "4"),  # not a thousands separator
    ("####", None),
    ("8 + 1 = 9. ####", "9"),  # a marker with nothing after it: the last number still counts
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_takes_the_first_marker_and_the_first_number_after_it():
    assert extract_answer("5 + 5 = 10.\n#### 10\n\nQuestion: 3 more? #### 13") == "10"


def test_strip_calculator_annotations():
    text = "Natalia sold 48/2 = <<48/2=24>>24 clips. She earned $<<12/60=0.2>>0.2 per minute."
    assert strip_calculator_annotations(text) == "Natalia sold 48/2 = 24 clips. She earned $0.2 per minute."


def _write_jsonl(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_load_local_jsonl(tmp_path):
    rows = [{"question": " Tom has 2 cats and gets 3 more. How many? ", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
            {"question": "Q2", "answer": "1,000 + 234 = 1,234\n#### 1,234"}]
    path = _write_jsonl(tmp_path / "d.jsonl", [json.dumps(rows[0]), "", json.dumps(rows[1])])
    assert load_gsm8k("test", path=path) == [
        Example("gsm8k-test-0", "Tom has 2 cats and gets 3 more. How many?", "2 + 3 = 5\n#### 5", "5"),
        Example("gsm8k-test-1", "Q2", "1,000 + 234 = 1,234\n#### 1,234", "1234"),
    ]
    assert load_gsm8k("test", path=path, strip_annotations=False)[0].solution == "2 + 3 = <<2+3=5>>5\n#### 5"
    assert [ex.id for ex in load_gsm8k("test", path=path, limit=1)] == ["gsm8k-test-0"]


@pytest.mark.parametrize("lines, message", [
    (['{"question": "q", "answer": "#### 1"}', '{"question": "q", "answer": '], r" line 2: invalid JSON \("),
    (['{"question": "q", "answer": "#### 1"}', "", '{"question": "q"}'], r" line 3: missing key 'answer'"),
    (['{"answer": "#### 1"}'], r" line 1: missing key 'question'"),
    (['{"question": "q", "answer": 4}'], r" line 1: key 'answer' is not a string"),
    (['["question", "answer"]'], r" line 1: expected a JSON object"),
    (['{"question": "q", "answer": "it is 4"}'], r" line 1: the solution does not end in '#### <number>'"),
    ([], r": empty file"),
    (["", "  "], r": empty file"),
])
def test_bad_local_file_names_file_and_line(tmp_path, lines, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match="^data.path=" + re.escape(path) + message) as caught:
        load_gsm8k("train", path=path)
    assert isinstance(caught.value, DataError) and "\n" not in str(caught.value)


def test_missing_local_file(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_gsm8k("train", path=str(tmp_path / "nope.jsonl"))


@needs_real_train
def test_extract_answer_reads_the_real_solutions():
    for line in REAL_TRAIN.read_text(encoding="utf-8").splitlines()[:200]:
        solution = json.loads(line)["answer"]
        after_marker = solution.split("#### ")[1].strip()
        assert extract_answer(solution) == after_marker.replace(",", "")
        assert extract_answer(strip_calculator_annotations(solution)) == after_marker.replace(",", "")


@needs_real_train
def test_load_real_train_split():
    examples = load_gsm8k("train", path=str(REAL_TRAIN))
    assert len(examples) == 7473
    assert len({ex.id for ex in examples}) == 7473
    assert not any("<<" in ex.solution or ">>" in ex.solution for ex in examples)
    # Spot checks against the file, read by hand.
    first = examples[0]
    assert first.id == "gsm8k-train-0"
    assert first.question.startswith("Natalia sold clips to 48 of her friends in April")
    assert first.solution == ("Natalia sold 48/2 = 24 clips in May.\n"
                              "Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72")
    assert first.answer == "72"
    assert examples[1].answer == "10" and "12/60 = $0.2 per minute" in examples[1].solution
    assert examples[2].answer == "5"
    assert {"1080", "109200000"} <= {ex.answer for ex in examples}  # "#### 1,080", "#### 109,200,000"


@pytest.mark.parametrize("text, holds", [
    ("8 - 6 = 2. 2 + 3 = 5. #### 5", True),
    ("18 + 12 = 31. 31 - 16 = 14. #### 14", False),
    ("She earns 12 * 3 = 36 dollars, 36 / 4 = 9 each. #### 9", True),
    ("1,200 + 34 = 1,234", True),
    ("10 / 4 = 2.5", True),
    ("10 / 0 = 1", False),
    ("no equations at all", True),
    ("3 x 4 = 13", False),
])
def test_equations_hold(text, holds):
    from pbkd_cli.data.gsm8k import equations_hold

    assert equations_hold(text) is holds


@needs_real_train
def test_real_gsm8k_solutions_mostly_hold():
    from pbkd_cli.data.gsm8k import equations_hold

    examples = load_gsm8k("train", path=str(REAL_TRAIN), limit=300)
    assert sum(equations_hold(ex.solution) for ex in examples) / len(examples) > 0.95


def test_a_hub_split_that_cannot_be_read_is_one_line_naming_the_local_key(monkeypatch):
    import datasets

    from pbkd_cli.config.schema import DataConfig, TaskName
    from pbkd_cli.data.gsm8k import HubUnavailable
    from pbkd_cli.data.tasks import load_examples

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (OfflineModeIsEnabled)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(HubUnavailable) as err:
        load_examples(DataConfig(task=TaskName.gsm8k, train_path="/data/train.jsonl"), "test")
    assert str(err.value) == ("data.hub_id=openai/gsm8k: its test split cannot be read (Couldn't reach "
                              "'openai/gsm8k' on the Hub (OfflineModeIsEnabled)); set data.test_path to a local JSONL")
    assert isinstance(err.value, DataError)
    with pytest.raises(DataError, match=r"^data.train_path=/data/train.jsonl: no such file$"):
        load_examples(DataConfig(task=TaskName.gsm8k, train_path="/data/train.jsonl"), "train")
