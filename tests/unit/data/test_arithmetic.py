import operator
import re

import pytest

from pbkd_cli.data.arithmetic import ArithmeticTaskConfig, generate_arithmetic_examples, tokenizer_training_corpus
from pbkd_cli.data.examples import DataError
from pbkd_cli.data.gsm8k import extract_answer

SMALL = ArithmeticTaskConfig(train_size=400, test_size=100)
EQUATION = re.compile(r"(-?\d+) ([-+*]) (\d+) = (-?\d+)\.")
APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _steps(solution: str) -> list[tuple[int, str, int, int]]:
    """The `a op b = c` steps of a solution, checked to be all there is before the answer."""
    body, answer = solution.split(" #### ")
    steps = EQUATION.findall(body)
    assert " ".join(f"{a} {op} {b} = {c}." for a, op, b, c in steps) == body, solution
    return [(int(a), op, int(b), int(c)) for a, op, b, c in steps]


def _both(config):
    return generate_arithmetic_examples(config, "train") + generate_arithmetic_examples(config, "test")


def test_the_documented_example_shape():
    example = generate_arithmetic_examples(SMALL, "train")[0]
    assert re.fullmatch(r"\w+ has \d+ \w+\. (He|She) .+ How many \w+ does \w+ have now\?", example.question)
    assert re.fullmatch(r"(-?\d+ [-+*] \d+ = -?\d+\. )+#### -?\d+", example.solution)


def test_same_config_same_examples_and_seed_changes_them():
    for split in ("train", "test"):
        assert generate_arithmetic_examples(SMALL, split) == generate_arithmetic_examples(SMALL, split)
    other_seed = ArithmeticTaskConfig(train_size=400, test_size=100, seed=1)
    assert [ex.question for ex in generate_arithmetic_examples(other_seed, "train")] != \
           [ex.question for ex in generate_arithmetic_examples(SMALL, "train")]


def test_sizes_ids_and_disjoint_splits():
    train, test = generate_arithmetic_examples(SMALL, "train"), generate_arithmetic_examples(SMALL, "test")
    assert [ex.id for ex in train] == [f"arith-train-{i}" for i in range(400)]
    assert [ex.id for ex in test] == [f"arith-test-{i}" for i in range(100)]
    train_questions = {ex.question for ex in train}
    assert len(train_questions) == 400 and len({ex.question for ex in test}) == 100
    assert not train_questions & {ex.question for ex in test}


def test_default_sizes():
    config = ArithmeticTaskConfig()
    assert len(generate_arithmetic_examples(config, "train")) == 4000
    assert len(generate_arithmetic_examples(config, "test")) == 200


@pytest.mark.parametrize("config", [
    SMALL,
    ArithmeticTaskConfig(min_steps=1, max_steps=4, max_operand=9, operations=("+", "-", "*"), max_multiplier=3,
                         train_size=300, test_size=50, seed=7),
    ArithmeticTaskConfig(operations=("-",), max_operand=30, train_size=200, test_size=50),
    ArithmeticTaskConfig(operations=("*",), max_multiplier=4, train_size=200, test_size=50),
])
def test_arithmetic_is_right_and_knobs_hold(config):
    step_counts = set()
    for example in _both(config):
        steps = _steps(example.solution)
        step_counts.add(len(steps))
        assert example.answer == extract_answer(example.solution) == str(steps[-1][3])
        start = steps[0][0]
        assert 1 <= start <= config.max_operand
        assert re.match(rf"\w+ has {start} ", example.question)
        for (a, op, b, c), following in zip(steps, steps[1:] + [None]):
            assert c == APPLY[op](a, b), example.solution
            assert op in config.operations
            assert 2 <= b <= config.max_multiplier if op == "*" else 1 <= b <= config.max_operand
            assert c >= 0  # allow_negative is off
            assert f" {b}" in example.question
            if following is not None:
                assert following[0] == c  # each step starts from the last result
    assert step_counts == set(range(config.min_steps, config.max_steps + 1))


def test_allow_negative_lets_amounts_go_below_zero():
    config = ArithmeticTaskConfig(operations=("-",), max_operand=10, allow_negative=True, train_size=200,
                                  test_size=20)
    examples = _both(config)
    assert any(int(ex.answer) < 0 for ex in examples)
    assert all(ex.answer == extract_answer(ex.solution) for ex in examples)
    for ex in examples:
        assert all(c == a - b for a, _, b, c in _steps(ex.solution))


@pytest.mark.parametrize("fields, message", [
    (dict(min_steps=3, max_steps=2), "min_steps <= max_steps"),
    (dict(min_steps=0), "min_steps <= max_steps"),
    (dict(operations=("/",)), "operations"),
    (dict(operations=()), "operations"),
    (dict(operations=("*",), max_multiplier=1), "max_multiplier"),
    (dict(max_operand=0), "max_operand"),
    (dict(test_size=-1), "sizes"),
])
def test_bad_knobs(fields, message):
    with pytest.raises(DataError, match=message):
        ArithmeticTaskConfig(**fields)


def test_knobs_that_allow_too_few_questions_fail_instead_of_looping():
    with pytest.raises(DataError, match="cannot make 2 steps"):
        generate_arithmetic_examples(ArithmeticTaskConfig(operations=("-",), max_operand=1), "train")
    tiny = ArithmeticTaskConfig(min_steps=1, max_steps=1, max_operand=1, operations=("*",), max_multiplier=2,
                                train_size=1000)
    with pytest.raises(DataError, match="found only 120 distinct train questions"):  # 12 names x 10 objects
        generate_arithmetic_examples(tiny, "train")


def test_unknown_split():
    with pytest.raises(DataError, match="unknown split 'dev'"):
        generate_arithmetic_examples(SMALL, "dev")


def test_tokenizer_corpus_is_deterministic_and_covers_the_templates():
    corpus = tokenizer_training_corpus(SMALL, n=50)
    assert corpus == tokenizer_training_corpus(SMALL, n=50)
    assert corpus != tokenizer_training_corpus(ArithmeticTaskConfig(seed=3), n=50)
    assert len(corpus) == len(tokenizer_training_corpus(SMALL, n=0)) + 100
    text = " ".join(corpus)
    for word in ("Mia", "Omar", "she", "toys", "ends up with", "times as many", "gives away", "How many",
                 "have now?", "Then", "####", "*"):
        assert word in text
