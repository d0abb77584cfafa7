"""A synthetic GSM8K-style task, generated in code: short multi-step arithmetic word problems.

    Question: Mia has 7 apples. She buys 5 more. Then she gives away 3. How many apples does Mia have now?
    Solution: 7 + 5 = 12. 12 - 3 = 9. #### 9

Short, templated and exactly checkable, so that Llamas of a few million parameters learn it on a
CPU in minutes; the number of steps, the operand range and the operations set how hard it is.
"""

from __future__ import annotations

import operator
import random
import re
from dataclasses import dataclass

from pbkd_cli.data.examples import DataError, Example
from pbkd_cli.data.gsm8k import ANSWER_MARKER

NAMES = (("Mia", "She"), ("Leo", "He"), ("Ava", "She"), ("Sam", "He"), ("Zoe", "She"), ("Max", "He"),
         ("Ivy", "She"), ("Ben", "He"), ("Emma", "She"), ("Noah", "He"), ("Lily", "She"), ("Omar", "He"))
OBJECTS = ("apples", "books", "coins", "stamps", "marbles", "pencils", "cards", "shells", "stickers", "toys")
# What each operation looks like in a question; `{n}` is its operand.
STEP_TEMPLATES = {
    "+": ("buys {n} more", "finds {n} more", "gets {n} more"),
    "-": ("gives away {n}", "loses {n}", "sells {n}"),
    "*": ("ends up with {n} times as many",),
}
OPENING = "{name} has {value} {thing}."
LATER_STEP = "Then {pronoun}"
QUESTION = "How many {thing} does {name} have now?"

_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}
# Give up after this many draws per wanted problem: the knobs then allow too few distinct problems
# (or, with only "-" and no negatives, none as long as min_steps).
_DRAWS_PER_EXAMPLE = 50


@dataclass(frozen=True)
class ArithmeticTaskConfig:
    min_steps: int = 2
    max_steps: int = 3
    max_operand: int = 20  # starting amounts and +/- operands lie in [1, max_operand]
    operations: tuple[str, ...] = ("+", "-")  # any of "+", "-", "*"
    max_multiplier: int = 5  # "*" operands lie in [2, max_multiplier]
    allow_negative: bool = False  # when False, no intermediate amount is ever below zero
    seed: int = 0
    train_size: int = 4000
    test_size: int = 200

    def __post_init__(self):
        where = "data.arithmetic"
        if not 1 <= self.min_steps <= self.max_steps:
            raise DataError(f"{where}: need 1 <= min_steps <= max_steps, got {self.min_steps} and {self.max_steps}")
        if self.max_operand < 1:
            raise DataError(f"{where}.max_operand={self.max_operand}: must be at least 1")
        if not self.operations or set(self.operations) - set(_APPLY):
            raise DataError(f"{where}.operations={list(self.operations)}: use some of '+', '-', '*'")
        if "*" in self.operations and self.max_multiplier < 2:
            raise DataError(f"{where}.max_multiplier={self.max_multiplier}: must be at least 2 with '*'")
        if self.train_size < 0 or self.test_size < 0:
            raise DataError(f"{where}: sizes must be >= 0, got {self.train_size} and {self.test_size}")


def _operand(config: ArithmeticTaskConfig, op: str, value: int, rng: random.Random) -> int:
    if op == "*":
        return rng.randint(2, config.max_multiplier)
    if op == "-" and not config.allow_negative:
        return rng.randint(1, min(value, config.max_operand))
    return rng.randint(1, config.max_operand)


def _draw_steps(config: ArithmeticTaskConfig, start: int, rng: random.Random) -> list[tuple[int, str, int, int]]:
    """`(a, op, b, a op b)` for each step, or [] when the amount hit zero with only "-" left to apply."""
    steps, value = [], start
    for _ in range(rng.randint(config.min_steps, config.max_steps)):
        allowed = [op for op in config.operations if op != "-" or config.allow_negative or value > 0]
        if not allowed:
            return []
        op = rng.choice(allowed)
        operand = _operand(config, op, value, rng)
        result = _APPLY[op](value, operand)
        steps.append((value, op, operand, result))
        value = result
    return steps


def _problem(config: ArithmeticTaskConfig, rng: random.Random) -> tuple[str, str, int]:
    """One `(question, solution, answer)`."""
    for _ in range(_DRAWS_PER_EXAMPLE):
        name, pronoun = rng.choice(NAMES)
        thing = rng.choice(OBJECTS)
        start = rng.randint(1, config.max_operand)
        steps = _draw_steps(config, start, rng)
        if steps:
            break
    else:
        raise DataError(f"data.arithmetic: operations={list(config.operations)} cannot make {config.min_steps} "
                        f"steps without going below zero; raise max_operand or set allow_negative")
    sentences = [OPENING.format(name=name, value=start, thing=thing)]
    for index, (_, op, operand, _) in enumerate(steps):
        subject = pronoun if index == 0 else LATER_STEP.format(pronoun=pronoun.lower())
        sentences.append(f"{subject} {rng.choice(STEP_TEMPLATES[op]).format(n=operand)}.")
    sentences.append(QUESTION.format(thing=thing, name=name))
    answer = steps[-1][3]
    equations = [f"{a} {op} {b} = {c}." for a, op, b, c in steps]
    return " ".join(sentences), " ".join([*equations, f"{ANSWER_MARKER} {answer}"]), answer


def _distinct_examples(config: ArithmeticTaskConfig, split: str, size: int, exclude: set[str]) -> list[Example]:
    # A string seed goes through SHA-512, the same in every process (unlike hash()): stable splits.
    rng = random.Random(f"arithmetic-{config.seed}-{split}")
    examples, seen = [], set(exclude)
    for _ in range(_DRAWS_PER_EXAMPLE * size):
        if len(examples) == size:
            break
        question, solution, answer = _problem(config, rng)
        if question in seen:
            continue
        seen.add(question)
        examples.append(Example(id=f"arith-{split}-{len(examples)}", question=question, solution=solution,
                                answer=str(answer)))
    if len(examples) < size:
        raise DataError(f"data.arithmetic: found only {len(examples)} distinct {split} questions of {size} "
                        "wanted; raise max_operand or max_steps, or lower the split's size")
    return examples


def generate_arithmetic_examples(config: ArithmeticTaskConfig, split: str) -> list[Example]:
    """The `split` ("train" or "test") of the task, the same for the same config; test questions never
    appear in train."""
    train = _distinct_examples(config, "train", config.train_size, exclude=set())
    if split == "train":
        return train
    if split == "test":
        return _distinct_examples(config, "test", config.test_size, exclude={ex.question for ex in train})
    raise DataError(f"data.arithmetic: unknown split {split!r} (train or test)")


def _template_words() -> list[str]:
    templates = [OPENING, LATER_STEP, QUESTION, *(t for ts in STEP_TEMPLATES.values() for t in ts)]
    return [re.sub(r"\{\w+\}", "", template) for template in templates]


def tokenizer_training_corpus(config: ArithmeticTaskConfig, n: int = 2000) -> list[str]:
    """Texts to fit a small tokenizer on: every fixed word of the templates (so that no template is
    split into bytes for want of examples), then `n` questions and their solutions."""
    pronouns = sorted({pronoun for _, pronoun in NAMES})
    vocabulary = [" ".join(name for name, _ in NAMES), " ".join(pronouns + [p.lower() for p in pronouns]),
                  " ".join(OBJECTS), *_template_words(), f"+ - * = {ANSWER_MARKER}"]
    rng = random.Random(f"arithmetic-{config.seed}-tokenizer")
    problems = [_problem(config, rng) for _ in range(n)]
    return vocabulary + [text for question, solution, _ in problems for text in (question, solution)]
