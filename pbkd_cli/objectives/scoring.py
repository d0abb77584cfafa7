"""Benchmark scores: multiple choice by log-likelihood, instruction following by ROUGE-L."""

from __future__ import annotations

from functools import lru_cache


def multiple_choice_figures(logprobs: list[list[float]], choice_chars: list[list[int]],
                            answers: list[int]) -> dict[str, float]:
    """Accuracy of picking the most likely choice, and of picking it by log-likelihood per character
    (`accuracy_norm`, the lm-evaluation-harness convention, fairer to long choices).

    `logprobs[i][j]` is log p(choice j | question i) summed over the choice's tokens; `choice_chars`
    the length of each choice's text.
    """
    def pick(scores: list[float]) -> int:
        return max(range(len(scores)), key=lambda j: scores[j])

    hits = [pick(lp) == a for lp, a in zip(logprobs, answers)]
    hits_norm = [pick([s / max(n, 1) for s, n in zip(lp, chars)]) == a
                 for lp, chars, a in zip(logprobs, choice_chars, answers)]
    return {"accuracy": sum(hits) / len(hits), "accuracy_norm": sum(hits_norm) / len(hits_norm)}


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of lower-cased alphanumeric tokens), in [0, 1]."""
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure
