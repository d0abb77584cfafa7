"""Each adversary of the game through the real engine on tiny models: its step must move its
objective the way the game says (the teacher's reward up against the student's, the Q-function's
moment gap up), and the verifiable reward must pay right answers only. An adversary whose step
stopped using its gap term, or flipped its sign, fails here."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pbkd_cli.config.schema import GameReward, LrSchedule, MinMaxConfig, PbkdConfig, TinyLlamaConfig, TrainerConfig, Variant
from pbkd_cli.data.prompts import encode_prompts, encode_responses, gold_response
from pbkd_cli.data.tasks import load_examples
from pbkd_cli.game.adversaries import QFunction, RewardModel, VerifiableReward, load_adversary
from pbkd_cli.game.student import rollout_batch
from pbkd_cli.generation.hf import Samples
from pbkd_cli.io import write_jsonl
from pbkd_cli.models.logits import next_token_logits
from pbkd_cli.models.roles import load_lm
from pbkd_cli.objectives.moment_matching import moment_gap

TINY = TinyLlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                       intermediate_size=64)


def game_config(tmp_path, **minmax) -> PbkdConfig:
    cfg = PbkdConfig(stage="minmax", deepspeed={"zero_optimization": {"stage": 0}})
    cfg.tokenizer = dataclasses.replace(cfg.tokenizer, vocab_size=300, corpus_size=300)
    cfg.data = dataclasses.replace(cfg.data, max_response_tokens=24,
                                   arithmetic=dataclasses.replace(cfg.data.arithmetic, train_size=16, test_size=4))
    for role in ("teacher", "student", "rm"):
        getattr(cfg.model, role).tiny = TINY
    cfg.trainer = TrainerConfig(lr=1e-3, warmup_ratio=0.0, lr_schedule=LrSchedule.constant, micro_batch_size=8)
    examples = load_examples(cfg.data, "train")
    prefs = tmp_path / "prefs.jsonl"
    write_jsonl(prefs, [{"id": ex.id, "question": ex.question, "answer": ex.answer, "prompt": ex.question,
                         "chosen": gold_response(ex), "rejected": " #### 0"} for ex in examples])
    cfg.minmax = MinMaxConfig(**{"prefs_path": str(prefs), "iterations": 10, "prompts_per_iteration": 4,
                                 "samples_per_prompt": 2, "rm_lr": 3e-3, "beta": 0.0, "reward_l2": 0.0,
                                 "rm_pref_batch": 4, **minmax})
    return cfg, examples


def own_samples(cfg, tokenizer, examples, idx) -> Samples:
    """The student's answers: a wrong final number without working, k per prompt."""
    k = cfg.minmax.samples_per_prompt
    prompts = encode_prompts([examples[i] for i in idx], cfg.data, tokenizer)
    texts = [f" #### {n}" for _ in idx for n in range(k)]
    return Samples(prompt_ids=[p for p in prompts for _ in range(k)],
                   response_ids=encode_responses(texts, cfg.data, tokenizer), texts=texts,
                   finished=[True] * len(texts), num_samples=k)


def teacher_samples(cfg, tokenizer, examples, idx) -> Samples:
    texts = [gold_response(examples[i]) for i in idx]
    return Samples(prompt_ids=encode_prompts([examples[i] for i in idx], cfg.data, tokenizer),
                   response_ids=encode_responses(texts, cfg.data, tokenizer), texts=texts,
                   finished=[True] * len(texts), num_samples=1)


def test_the_reward_models_step_raises_the_teachers_reward_over_the_students(tmp_path):
    cfg, examples = game_config(tmp_path)
    torch.manual_seed(0)
    tokenizer, _ = load_lm(cfg, "student")
    idx = [0, 1, 2, 3]
    answers = {i: [gold_response(examples[i])] for i in range(len(examples))}
    rm = RewardModel(cfg, examples, answers, tokenizer)
    own, teacher = own_samples(cfg, tokenizer, examples, idx), teacher_samples(cfg, tokenizer, examples, idx)
    own_index = [i for i in idx for _ in range(2)]

    def gap() -> float:
        return rm.rewards(teacher, idx).mean().item() - rm.rewards(own, own_index).mean().item()

    before = gap()
    for _ in range(10):
        figures = rm.step(idx, own, own_index, None, require_finite=lambda v: None)
    assert set(figures) >= {"rm/gap", "rm/bt_loss", "rm/pref_accuracy"}
    assert gap() > before + 1.0, (before, gap())
    assert rm.pref_batches.state_dict() == {"taken": 10}


def test_the_reward_models_step_scores_both_sides_in_one_batch_as_it_would_apart(tmp_path, monkeypatch):
    from pbkd_cli.game import adversaries

    cfg, examples = game_config(tmp_path)
    torch.manual_seed(0)
    tokenizer, _ = load_lm(cfg, "student")
    idx = [0, 1, 2, 3]
    rm = RewardModel(cfg, examples, {i: [gold_response(examples[i])] for i in range(len(examples))}, tokenizer)
    own, teacher = own_samples(cfg, tokenizer, examples, idx), teacher_samples(cfg, tokenizer, examples, idx)
    own_index = [i for i in idx for _ in range(2)]
    apart = rm.rewards(teacher, idx), rm.rewards(own, own_index)  # the weights the step starts from
    scored, played = [], {}
    real_score, real_objective = adversaries.score, adversaries.rm_game_objective
    monkeypatch.setattr(adversaries, "score", lambda model, batch: scored.append(len(batch.input_ids))
                        or real_score(model, batch))
    monkeypatch.setattr(adversaries, "rm_game_objective", lambda **kw: played.update(kw) or real_objective(**kw))
    rm.step(idx, own, own_index, None, require_finite=lambda v: None)
    assert scored == [2 * cfg.minmax.rm_pref_batch, len(idx) + len(own_index)]  # preference pairs; both sides
    assert torch.allclose(played["teacher_rewards"].detach(), apart[0], atol=1e-5)
    assert torch.allclose(played["student_rewards"].detach(), apart[1], atol=1e-5)


def test_the_q_functions_step_raises_its_moment_gap_and_its_student_term_is_differentiable(tmp_path):
    cfg, examples = game_config(tmp_path)
    cfg.variant = Variant.white_box
    # The gap's student term at the taken tokens (the fixed answers below are not pi_old's samples).
    cfg.minmax.white_box.expected_student_term = False
    torch.manual_seed(0)
    tokenizer, policy = load_lm(cfg, "student")
    q = load_adversary(cfg, examples, None, tokenizer, policy)
    assert isinstance(q, QFunction) and q.vocab_size == len(tokenizer)
    idx = [0, 1, 2, 3]
    own = own_samples(cfg, tokenizer, examples, idx)
    own_index = [i for i in idx for _ in range(2)]
    rollout = rollout_batch(own, tokenizer, torch.device("cpu"))
    def gap() -> float:  # read off the Q-function itself, not the step's own figures
        with torch.no_grad():
            q_values = next_token_logits(q.engine.module, rollout, q.vocab_size)
        return moment_gap(q_values, q.expert_probs(rollout), rollout.input_ids[:, 1:],
                          rollout.response_mask[:, 1:]).item()

    before = gap()
    for _ in range(10):
        figures = q.step(idx, own, own_index, rollout, require_finite=lambda v: None)
    assert gap() > before + 0.1, (before, gap())
    assert figures["q/moment_gap"] == pytest.approx(gap(), abs=0.5)
    rewards = q.rewards(own, own_index, rollout)
    assert rewards.shape == (len(own.texts),) and torch.isfinite(rewards).all()
    assert torch.allclose(q.rewards(own, own_index), rewards)  # the rollout built from the samples alike
    # With the teacher's answers in the groups its step still reads the student's own samples only.
    groups = own.joined([[r] for r in teacher_samples(cfg, tokenizer, examples, idx).response_ids],
                        [[gold_response(examples[i])] for i in idx])
    joined = rollout_batch(groups, tokenizer, torch.device("cpu"))
    own_gap = gap()
    assert q.step(idx, own, own_index, joined, require_finite=lambda v: None)["q/moment_gap"] == pytest.approx(own_gap)
    logits = policy(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask).logits[:, :-1, :q.vocab_size]
    term, metrics = q.student_term(slice(0, 4), logits[:4])
    term.backward()
    assert "moment_matching" in metrics and policy.lm_head.weight.grad.abs().sum() > 0


def test_the_verifiable_reward_pays_right_answers_with_right_steps_only(tmp_path):
    cfg, examples = game_config(tmp_path, reward=GameReward.correctness)
    tokenizer, _ = load_lm(cfg, "student")
    adversary = load_adversary(cfg, examples, None, tokenizer, None)
    assert isinstance(adversary, VerifiableReward) and adversary.engine is None
    ex = examples[0]
    # The gold working, the right number after a wrong step, a wrong number.
    texts = [gold_response(ex), " 1 + 1 = 3. #### " + ex.answer, " #### -1"]
    samples = Samples(prompt_ids=[[1]] * 3, response_ids=[[1]] * 3, texts=texts, finished=[True] * 3, num_samples=3)
    assert adversary.rewards(samples, [0] * 3).tolist() == [1.0, 0.0, 0.0]
    assert adversary.step([0], samples, [0] * 3, None, None) == {}
