"""The student step of both games through the real DeepSpeed engine, on a tiny Llama in-process.

One step on a fixed batch must move each sequence's log-probability the way its advantage says, from
the first optimiser step on; and a short game on a toy reward must learn, where the same game on
shuffled rewards must not: a step that stopped using its reward, or flipped its sign, fails here.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from pbkd_cli.config.schema import LrSchedule, MinMaxConfig, PbkdConfig, TinyLlamaConfig, TrainerConfig
from pbkd_cli.data.prompts import collate, encode_prompts
from pbkd_cli.data.tasks import load_examples
from pbkd_cli.engine.deepspeed_engine import lr_multiplier
from pbkd_cli.models import load_causal_lm
from pbkd_cli.objectives.policy_gradient import group_advantages
from pbkd_cli.config.schema import out_of_range, unplayable_game
from pbkd_cli.game.student import policy_engines, policy_step, rollout_batch, sample_responses
from pbkd_cli.io import PbkdError
from pbkd_cli.models.logits import token_logprobs
from pbkd_cli.models.roles import load_role_tokenizer

ZERO0 = {"zero_optimization": {"stage": 0}}


def game_config(**minmax) -> PbkdConfig:
    cfg = PbkdConfig(stage="minmax", deepspeed=ZERO0)
    cfg.tokenizer = dataclasses.replace(cfg.tokenizer, vocab_size=300, corpus_size=300)
    cfg.data = dataclasses.replace(cfg.data, max_response_tokens=8,
                                   arithmetic=dataclasses.replace(cfg.data.arithmetic, train_size=64, test_size=8))
    cfg.model.student.tiny = TinyLlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             num_key_value_heads=2, intermediate_size=64)
    cfg.trainer = TrainerConfig(lr=1e-2, warmup_ratio=0.0, lr_schedule=LrSchedule.constant, micro_batch_size=16)
    cfg.minmax = MinMaxConfig(**{"prompts_per_iteration": 8, "samples_per_prompt": 4, "ppo_epochs": 1,
                                 "kl_coef": 0.0, "iterations": 1, **minmax})
    return cfg


def game_problem(cfg: PbkdConfig) -> str | None:
    """What the schema says of a game's settings at composition time."""
    return out_of_range(cfg) or unplayable_game(cfg)


def sample_rollouts(cfg, engine, tokenizer, prompts, idx):
    samples, _ = sample_responses(cfg, engine, tokenizer, prompts, idx)
    return samples, rollout_batch(samples, tokenizer, engine.device)


def tiny_policy(cfg: PbkdConfig, seed: int = 0):
    torch.manual_seed(seed)
    tokenizer = load_role_tokenizer(cfg, "student")
    return tokenizer, load_causal_lm(cfg.model.student, tokenizer, "model.student")


def test_lr_multiplier_moves_on_the_first_step_and_decays_to_zero():
    assert lr_multiplier(0, "cosine", warmup=3, total=10) == pytest.approx(0.25)
    assert lr_multiplier(3, "cosine", warmup=3, total=10) == pytest.approx(1.0)
    assert lr_multiplier(10, "cosine", warmup=3, total=10) == pytest.approx(0.0)
    assert lr_multiplier(5, "linear", warmup=0, total=10) == pytest.approx(0.5)
    assert lr_multiplier(0, "constant", warmup=0, total=10) == 1.0
    assert lr_multiplier(6, "cosine", warmup=0, total=12) == pytest.approx(0.5)


def test_one_step_raises_positive_and_lowers_negative_sequences_from_the_first_update():
    # A warm-up over half the steps: the first update must already move the weights (it ran at lr 0).
    cfg = game_config(iterations=2)
    cfg.trainer = dataclasses.replace(cfg.trainer, warmup_ratio=0.5, lr_schedule=LrSchedule.cosine)
    tokenizer, policy = tiny_policy(cfg)
    engine, reference = policy_engines(cfg, policy)
    assert reference is None
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (5,), generator=generator).tolist() for _ in range(32)]
    responses = [torch.randint(3, 300, (6,), generator=generator).tolist() for _ in range(32)]
    rollout = collate(prompts, responses, tokenizer.pad_token_id)
    old = token_logprobs(engine.module, rollout, 16)
    advantages = torch.tensor([1.0, -1.0] * 16)
    policy_step(cfg, engine, rollout, old, None, advantages, require_finite=lambda v: None)
    assert engine.global_steps == 1 and engine.get_lr()[0] > 0
    change = (token_logprobs(engine.module, rollout, 16) - old).sum(-1)
    assert (change[advantages > 0] > 0).all() and (change[advantages < 0] < 0).all()


def test_a_single_update_without_old_logprobs_is_the_same_step_as_with_them():
    """One update on freshly sampled rollouts: pi_old's log-probs are the step's own (minmax skips
    that forward pass), so the weights after it equal those of the step given them."""
    cfg = game_config()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (5,), generator=generator).tolist() for _ in range(32)]
    responses = [torch.randint(3, 300, (6,), generator=generator).tolist() for _ in range(32)]
    advantages = torch.tensor([1.0, -0.5, 0.25, -1.0] * 8)
    after = []
    for given in (True, False):
        tokenizer, policy = tiny_policy(cfg)
        engine, _ = policy_engines(cfg, policy)
        rollout = collate(prompts, responses, tokenizer.pad_token_id)
        old = token_logprobs(engine.module, rollout, 16) if given else None
        metrics = policy_step(cfg, engine, rollout, old, None, advantages, require_finite=lambda v: None)
        assert engine.global_steps == 1 and all(m["clip_fraction"] == 0 for m in metrics)
        after.append(torch.cat([p.detach().flatten() for p in engine.module.parameters()]))
    torch.testing.assert_close(after[0], after[1], rtol=0, atol=1e-7)


def toy_reward(response_ids: list[list[int]], vocab: int) -> torch.Tensor:
    """Prefer low token ids: dense, and far from what an untrained model emits."""
    return torch.tensor([-sum(r) / max(1, len(r)) / vocab for r in response_ids])


def play(shuffle_rewards: bool, iterations: int = 20) -> list[float]:
    cfg = game_config(iterations=iterations, temperature=1.0)
    tokenizer, policy = tiny_policy(cfg)
    engine, _ = policy_engines(cfg, policy)
    prompts = encode_prompts(load_examples(cfg.data, "train"), cfg.data, tokenizer)
    shuffler = torch.Generator().manual_seed(2)
    torch.manual_seed(3)
    mean_rewards = []
    for iteration in range(iterations):
        idx = list(range(iteration * 8 % 64, iteration * 8 % 64 + 8))
        samples, rollout = sample_rollouts(cfg, engine, tokenizer, prompts, idx)
        rewards = toy_reward(samples.response_ids, len(tokenizer))
        mean_rewards.append(rewards.mean().item())
        if shuffle_rewards:
            rewards = rewards[torch.randperm(len(rewards), generator=shuffler)]
        advantages = group_advantages(rewards, cfg.minmax.samples_per_prompt, scale="batch")
        old = token_logprobs(engine.module, rollout, cfg.trainer.micro_batch_size)
        policy_step(cfg, engine, rollout, old, None, advantages, require_finite=lambda v: None)
    return mean_rewards


def test_a_short_game_learns_its_reward_and_not_a_shuffled_one():
    learnt, shuffled = play(shuffle_rewards=False), play(shuffle_rewards=True)
    assert all(math.isfinite(r) for r in learnt + shuffled)
    gain = sum(learnt[-3:]) / 3 - sum(learnt[:3]) / 3
    noise = sum(shuffled[-3:]) / 3 - sum(shuffled[:3]) / 3
    assert gain > 0.15, learnt
    assert gain > 3 * abs(noise), (learnt, shuffled)


@pytest.mark.parametrize("minmax, key", [
    ({"rollouts_per_update": 24}, "minmax.rollouts_per_update=24"),
    ({"negative_weight": -0.5}, "minmax.negative_weight=-0.5"),
    ({"oversample": 0}, "minmax.oversample=0"),
    ({"distrusted_fraction": 0.2, "oversample": 2}, "minmax.distrusted_fraction=0.2"),
    ({"teacher_samples_per_prompt": 2, "teacher_temperature": 0.0}, "minmax.teacher_samples_per_prompt=2"),
    ({"continue_from": "outputs/iter1/minmax"}, "minmax.continue_from=outputs/iter1/minmax"),
])
def test_bad_game_settings_are_one_line_before_any_model_loads(minmax, key):
    problem = game_problem(game_config(**minmax))
    assert problem.startswith(key) and "\n" not in problem


def test_games_played_one_after_another_visit_the_prompts_of_one_long_game():
    from pbkd_cli.game.student import prompt_schedule
    # 40 prompts, pools of 8: an epoch is 5 pools. Two rounds of 3 iterations each = one game of 6.
    whole = prompt_schedule(40, 8, seed=3, iterations=6)
    rounds = prompt_schedule(40, 8, seed=3, iterations=3) + prompt_schedule(40, 8, seed=3, iterations=3, offset=3)
    assert rounds == whole
    # Within an epoch no prompt comes back: the second round's first pools are new prompts.
    first, second = prompt_schedule(40, 8, 3, 2), prompt_schedule(40, 8, 3, 2, offset=2)
    assert not {i for pool in first for i in pool} & {i for pool in second for i in pool}
    assert sorted(i for pool in whole[:5] for i in pool) == list(range(40))


def test_widest_prompts_keep_each_sample_with_its_own_reward():
    from pbkd_cli.generation.hf import Samples
    from pbkd_cli.game.student import widest_prompts
    # Pool of prompts 7, 3, 5 with 2 samples each; only prompt 5's samples differ in reward.
    samples = Samples(prompt_ids=[[7], [7], [3], [3], [5], [5]], response_ids=[[1], [2], [3], [4], [5], [6]],
                      texts=["a", "b", "c", "d", "e", "f"], finished=[True] * 6, num_samples=2)
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    idx, kept, kept_rewards = widest_prompts([7, 3, 5], samples, rewards, keep=2)
    assert idx == [7, 5]
    assert kept.prompt_ids == [[7], [7], [5], [5]] and kept.response_ids == [[1], [2], [5], [6]]
    assert kept_rewards.tolist() == [1.0, 1.0, 0.0, 1.0]


def test_every_adversary_plays_with_oversampling_and_the_teacher_in_the_group():
    from pbkd_cli.config.schema import GameReward, Variant

    for variant in Variant:
        for reward in GameReward:
            cfg = game_config(oversample=2, teacher_in_group=True, distrusted_fraction=0.2, rollouts_per_update=40)
            cfg.trainer.micro_batch_size = 8
            cfg.variant, cfg.minmax.reward = variant, reward
            assert game_problem(cfg) is None, (variant, reward)


def test_teacher_answers_join_each_group_after_the_students_own():
    from pbkd_cli.generation.hf import Samples
    samples = Samples(prompt_ids=[[7], [7], [3], [3]], response_ids=[[1], [2], [3], [4]],
                      texts=["a", "b", "c", "d"], finished=[True, False, True, True], num_samples=2)
    joined = samples.joined([[[9]], [[8]]], [["T7"], ["T3"]])
    assert joined.num_samples == 3 and joined.num_groups == 2
    assert joined.prompt_ids == [[7], [7], [7], [3], [3], [3]]
    assert joined.response_ids == [[1], [2], [9], [3], [4], [8]]
    assert joined.texts == ["a", "b", "T7", "c", "d", "T3"]
    assert joined.finished == [True, False, True, True, True, True]
    assert joined.head(2) == samples
    with pytest.raises(ValueError, match="same number of responses"):
        samples.joined([[[9]], [[8], [6]]], [["T7"], ["T3", "x"]])


def test_teacher_answers_in_the_group_count_in_the_batch_arithmetic_and_the_budget():
    cfg = game_config(teacher_in_group=True, iterations=3)
    cfg.trainer.micro_batch_size = 8
    assert cfg.minmax.group_size() == 5 and cfg.minmax.rollouts() == 40 and cfg.minmax.updates_per_epoch() == 1
    assert cfg.minmax.student_train_sequences() == 3 * 8 * 5
    assert game_problem(cfg) is None
    cfg.minmax.rollouts_per_update = 32
    assert re.match(r"^minmax.rollouts_per_update=32: .* 5 responses per group = 40", game_problem(cfg))


def test_where_every_own_sample_is_wrong_the_step_imitates_the_teachers_answer_in_the_group():
    # Toy: the student's samples all earn 0, the teacher's answer (a fixed token string no untrained
    # model samples) earns 1. With the teacher in the group its log-probability must climb; with the
    # same rewards on the student's samples only, the group is silent and nothing is learnt about it.
    def teacher_logprob_gain(teacher_in_group: bool) -> float:
        cfg = game_config(iterations=6, teacher_in_group=teacher_in_group, negative_weight=0.0)
        cfg.trainer.micro_batch_size = 8
        tokenizer, policy = tiny_policy(cfg)
        engine, _ = policy_engines(cfg, policy)
        prompts = encode_prompts(load_examples(cfg.data, "train"), cfg.data, tokenizer)[:8]
        answer = [[[11, 12, 13, tokenizer.eos_token_id]] for _ in prompts]
        target = collate(prompts, [a[0] for a in answer], tokenizer.pad_token_id)
        before = token_logprobs(engine.module, target, 8).sum(-1).mean().item()
        torch.manual_seed(3)
        for _ in range(6):
            samples, _ = sample_rollouts(cfg, engine, tokenizer, prompts, list(range(8)))
            if teacher_in_group:
                samples = samples.joined(answer, [["t"] for _ in prompts])
            k = samples.num_samples
            rewards = torch.tensor([float(teacher_in_group and j == k - 1) for _ in prompts for j in range(k)])
            rollout = collate(samples.prompt_ids, samples.response_ids, tokenizer.pad_token_id)
            advantages = group_advantages(rewards, k, scale="batch")
            old = token_logprobs(engine.module, rollout, 8)
            policy_step(cfg, engine, rollout, old, None, advantages, require_finite=lambda v: None)
        return token_logprobs(engine.module, target, 8).sum(-1).mean().item() - before

    imitated, silent = teacher_logprob_gain(True), teacher_logprob_gain(False)
    assert imitated > 2.0
    assert abs(silent) < 0.1


def test_teacher_answers_are_read_by_prompt_id_and_a_missing_one_is_one_line(tmp_path):
    from pbkd_cli.io import write_jsonl
    from pbkd_cli.game.student import teacher_answers

    cfg = game_config()
    examples = load_examples(cfg.data, "train")[:3]
    path = tmp_path / "teacher_responses.jsonl"
    write_jsonl(path, [{"id": ex.id, "question": ex.question, "response": f"answer {n}"}
                       for n, ex in reversed(list(enumerate(examples[:2])))])
    cfg.minmax.teacher_answers_path = str(path)
    assert teacher_answers(cfg, examples, [1, 0]) == {1: ["answer 1"], 0: ["answer 0"]}
    with pytest.raises(PbkdError, match=rf"^minmax.teacher_answers_path=.*: 0 answers for prompt {examples[2].id}"):
        teacher_answers(cfg, examples, [0, 2])


def test_positive_on_wrong_is_the_share_of_push_up_that_goes_to_wrong_answers():
    from pbkd_cli.data.examples import Example
    from pbkd_cli.generation.hf import Samples
    from pbkd_cli.game.figures import positive_on_wrong

    examples = [Example(id="a", question="q", solution="", answer="3")]
    samples = Samples(prompt_ids=[[1]] * 4, response_ids=[[1]] * 4, finished=[True] * 4, num_samples=4,
                      texts=["1 + 2 = 3. #### 3", "#### 4", "#### 5", "#### 3"])
    advantages = torch.tensor([1.0, 3.0, -2.0, 0.0])  # wrong answers get 3 of the 4 pushed up
    assert positive_on_wrong(advantages, samples, examples, [0, 0, 0, 0]) == pytest.approx(0.75)
