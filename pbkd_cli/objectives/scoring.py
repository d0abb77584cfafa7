"""Benchmark scores: multiple choice by log-likelihood, instruction following by ROUGE-L, and what k
samples per problem add to a greedy answer."""

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


def sampled_figures(greedy_correct: list[bool], sampled_correct: list[int], majority_correct: list[bool],
                    k: int) -> dict[str, float]:
    """Per-sample accuracy, majority vote, pass@k and `headroom@k` over problems, each sampled k times.

    `headroom@k` is the share of problems whose greedy answer is wrong but one of the k samples is
    right: the most that training the model towards its own right samples (RL on a verifiable or
    learned reward, rejection-sampling fine-tuning) can add to greedy accuracy at k samples a problem,
    short of teaching it something it never says. `sampled_correct[i]` counts problem i's right samples.
    """
    n = len(greedy_correct)
    return {"sampled_accuracy": sum(sampled_correct) / (k * n),
            f"maj@{k}": sum(majority_correct) / n,
            f"pass@{k}": sum(c > 0 for c in sampled_correct) / n,
            f"headroom@{k}": sum(c > 0 and not g for g, c in zip(greedy_correct, sampled_correct)) / n}


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of lower-cased alphanumeric tokens), in [0, 1]."""
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure
