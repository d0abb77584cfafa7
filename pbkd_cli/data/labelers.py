"""Rank a prompt's candidate responses into (chosen, rejected) pairs.

- `teacher_preferred`: the teacher's response beats the student's (the paper's online setting).
- `correctness`: a response whose final answer matches the gold answer (and whose written steps
  hold) beats one that does not, whoever wrote it; prompts where all or none are right give no pair.
- `llm_judge`: an LLM behind an OpenAI-compatible API says which of two responses is better.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from pbkd_cli.data.gsm8k import equations_hold, extract_answer
from pbkd_cli.generation.openai_api import ChatEndpoint


@dataclass(frozen=True)
class Candidate:
    text: str
    source: str  # "teacher" | "student"


@dataclass(frozen=True)
class RankedPair:
    chosen: Candidate
    rejected: Candidate


def teacher_preferred(teacher: list[Candidate], student: list[Candidate], max_pairs: int) -> list[RankedPair]:
    """Pair the i-th student sample with the i-th teacher sample (teacher samples reused cyclically).

    A student sample that is word for word a teacher sample of the prompt is not paired: "y over y"
    carries no preference, and where the student already answers as the teacher does (66% of the demo's
    pairs once vanilla KD has converged) such pairs would only dilute the loss and its accuracy figure.
    """
    taught = {t.text for t in teacher}
    distinct = [s for s in student if s.text not in taught]
    return [RankedPair(teacher[i % len(teacher)], s) for i, s in enumerate(distinct[:max_pairs])]


def is_correct(text: str, answer: str, check_equations: bool) -> bool:
    return extract_answer(text) == answer and (not check_equations or equations_hold(text))


def correctness_rewards(texts: list[str], answers: list[str], check_equations: bool = True) -> list[float]:
    """The verifiable reward of each response: 1 if it is right (`is_correct`), else 0."""
    return [float(is_correct(text, answer, check_equations)) for text, answer in zip(texts, answers)]


def correctness(candidates: list[Candidate], answer: str, max_pairs: int,
                check_equations: bool = True) -> list[RankedPair]:
    """Right solutions over wrong ones; identical texts are never paired.

    Right means the final answer matches and, with `check_equations`, every written step holds.
    """
    right = [c for c in candidates if is_correct(c.text, answer, check_equations)]
    wrong = [c for c in candidates if not is_correct(c.text, answer, check_equations)]
    pairs = []
    for i in range(max(len(right), len(wrong))):
        if len(pairs) == max_pairs or not right or not wrong:
            break
        chosen, rejected = right[i % len(right)], wrong[i % len(wrong)]
        if chosen.text != rejected.text:
            pairs.append(RankedPair(chosen, rejected))
    return pairs


JUDGE_PROMPT = """You compare two answers to the same question. Reply with exactly one letter: A if answer A is \
better (correct, complete and clear), B if answer B is better.

Question:
{question}

Answer A:
{a}

Answer B:
{b}"""


def parse_verdict(reply: str) -> str | None:
    match = re.search(r"\b([AB])\b", reply.strip().upper())
    return match.group(1) if match else None


def judge_pairs(endpoint: ChatEndpoint, questions: list[str], pairs: list[tuple[Candidate, Candidate]],
                rng: random.Random) -> list[RankedPair | None]:
    """Ask the judge about each (x, y); the order shown is shuffled to cancel position bias.

    An unparseable verdict gives None (the pair is dropped) rather than a guess.
    """
    shown = [(x, y) if rng.random() < 0.5 else (y, x) for x, y in pairs]
    chats = [[{"role": "user", "content": JUDGE_PROMPT.format(question=q, a=a.text, b=b.text)}]
             for q, (a, b) in zip(questions, shown)]
    replies = endpoint.complete_many(chats, temperature=0.0, max_tokens=4)
    ranked = []
    for (a, b), texts in zip(shown, replies):
        verdict = parse_verdict(texts[0])
        ranked.append(None if verdict is None else RankedPair(a, b) if verdict == "A" else RankedPair(b, a))
    return ranked
