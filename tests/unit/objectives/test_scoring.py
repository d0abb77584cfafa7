"""Benchmark scores against hand computations."""

from __future__ import annotations

import pytest

from pbkd_cli.objectives.scoring import multiple_choice_figures, rouge_l, sampled_figures


def test_multiple_choice_accuracy_and_per_character_accuracy():
    # Item 1: choice 0 is likelier in total, choice 1 per character (-4/8 = -0.5 > -2/2 = -1).
    # Item 2: choice 2 wins both ways.
    logprobs = [[-2.0, -4.0], [-5.0, -6.0, -1.0]]
    chars = [[2, 8], [3, 3, 3]]
    figures = multiple_choice_figures(logprobs, chars, answers=[1, 2])
    assert figures == {"accuracy": 0.5, "accuracy_norm": 1.0}


def test_rouge_l_is_the_lcs_f1_of_lower_cased_tokens():
    # LCS("the cat sat on the mat", "The cat is on the mat") = the cat on the mat: 5 tokens.
    precision, recall = 5 / 6, 5 / 6
    assert rouge_l("The cat is on the mat", "the cat sat on the mat") == pytest.approx(
        2 * precision * recall / (precision + recall))
    # Prediction of 2 tokens, reference of 4, LCS 2: P = 1, R = 0.5.
    assert rouge_l("paris france", "the capital paris france") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert rouge_l("", "anything") == 0.0 and rouge_l("same words", "Same words.") == 1.0


def test_sampled_figures_by_hand():
    # Four problems, 4 samples each. Greedy right on 0 and 1; problem 2 is greedy-wrong with one right
    # sample (the only headroom); problem 3 has no right sample at all.
    figures = sampled_figures(greedy_correct=[True, True, False, False], sampled_correct=[4, 0, 1, 0],
                              majority_correct=[True, False, False, False], k=4)
    assert figures == {"sampled_accuracy": 5 / 16, "maj@4": 0.25, "pass@4": 0.5, "headroom@4": 0.25}


def test_headroom_never_counts_a_problem_greedy_already_gets_right():
    figures = sampled_figures([True, True], [3, 1], [True, True], k=3)
    assert figures["pass@3"] == 1.0 and figures["headroom@3"] == 0.0
