"""Rows that share a prompt run it once (`models/logits.shared_prompt_forward`): the log-probs, rewards and
gradients must be those of a forward over the whole rows, in float64, for every model wrapper the stages
use, and the step on a DeepSpeed engine must land on the same weights.

Gradients agree to float32 rounding only: Llama's RMSNorm computes in float32 even in a float64 model."""

from __future__ import annotations

import peft
import pytest
import torch

from pbkd_cli.config.schema import RewardPooling
from pbkd_cli.data.prompts import TokenBatch, collate, pair_batch
from pbkd_cli.game.student import policy_engines, policy_step
from pbkd_cli.models import logits as logits_module
from pbkd_cli.models.logits import (next_token_logits, response_logprobs, share_prompts, shared_prompt_forward,
                                    token_logprobs)
from pbkd_cli.models.lora import AdapterDisabled
from pbkd_cli.models.reward import load_reward_model, score
from pbkd_cli.objectives.policy_gradient import sequence_logprobs
from tests.unit.test_game_step import game_config, tiny_policy
from tests.unit.tiny import tiny_arch, tiny_lm, tiny_tokenizer

PAD = 0


def grouped_batch(pad_id: int, seed: int = 0) -> TokenBatch:
    """3 prompts of 7, 3 and 12 tokens x 3 responses of 0 to 14 tokens, rows shuffled (a pair batch and a
    cut micro-batch do not keep a prompt's rows together)."""
    generator = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for length in (7, 3, 12):
        prompt = torch.randint(5, 80, (length,), generator=generator).tolist()
        for size in torch.randint(0, 15, (3,), generator=generator).tolist():
            prompts.append(prompt)
            responses.append(torch.randint(5, 80, (size,), generator=generator).tolist())
    order = torch.randperm(len(prompts), generator=generator).tolist()
    return collate([prompts[i] for i in order], [responses[i] for i in order], pad_id)


def flat_logprobs(model, batch):
    return sequence_logprobs(next_token_logits(model, batch), batch.input_ids[:, 1:], batch.response_mask[:, 1:])


@pytest.fixture
def no_sharing(monkeypatch):
    """Every batch through the forward over whole rows."""
    def off():
        monkeypatch.setattr(logits_module, "MIN_TOKENS_SAVED", 2.0)
    return off


def test_rows_are_cut_before_their_last_prompt_token_and_each_prefix_kept_once(monkeypatch):
    monkeypatch.setattr(logits_module, "MIN_TOKENS_SAVED", -1.0)  # these short rows would save nothing
    batch = collate([[5, 6, 7], [9, 8], [5, 6, 7]], [[1, 2], [3, 4, 10, 11], [4]], PAD)
    split = share_prompts(batch, PAD)
    assert split.prefix_ids.tolist() == [[5, 6], [9, PAD]] and split.prefix_mask.tolist() == [[1, 1], [1, 0]]
    assert split.row_prefix.tolist() == [0, 1, 0]
    assert split.suffix_ids.tolist() == [[7, 1, 2, PAD, PAD], [8, 3, 4, 10, 11], [7, 4, PAD, PAD, PAD]]
    assert split.suffix_mask.tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 1, 0, 0, 0]]
    # Real tokens at their row's positions; padding at the row's last one.
    assert split.suffix_positions.tolist() == [[2, 3, 4, 5, 5], [1, 2, 3, 4, 5], [2, 3, 4, 5, 5]]
    assert split.attention_mask.tolist()[1] == [1, 0, 1, 1, 1, 1, 1]


def test_batches_that_would_not_save_tokens_or_are_not_prompt_then_response_run_whole():
    distinct = collate([[5, 6, 7], [9, 8, 4]], [[1, 2], [3]], PAD)  # an SFT batch: every prompt once
    assert share_prompts(distinct, PAD) is None
    one_token = collate([[5], [5]], [[1, 2, 3], [4]], PAD)
    assert share_prompts(one_token, PAD) is None
    shared = collate([[5, 6, 7, 8]] * 4, [[1], [2], [3], [4]], PAD)
    left_padded = TokenBatch(shared.input_ids.flip(1), shared.attention_mask.flip(1), shared.response_mask.flip(1))
    assert share_prompts(shared, PAD) is not None and share_prompts(left_padded, PAD) is None


@pytest.mark.parametrize("wrap", ["plain", "lora", "adapter_disabled"])
def test_response_logprobs_and_their_gradients_equal_the_whole_rows_forward(wrap, no_sharing):
    tokenizer = tiny_tokenizer()
    model = tiny_lm(tokenizer, layers=2).double()
    if wrap != "plain":
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    runner = AdapterDisabled(model) if wrap == "adapter_disabled" else model
    batch = grouped_batch(tokenizer.pad_token_id)
    assert shared_prompt_forward(runner, batch) is not None
    results = []
    for share in (True, False):
        if not share:
            no_sharing()
        model.zero_grad()
        logprobs = response_logprobs(runner, batch)
        grads = []
        if logprobs.requires_grad:
            (logprobs * torch.linspace(-1, 1, logprobs.shape[1], dtype=logprobs.dtype)).sum().backward()
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((logprobs.detach(), grads))
    (shared, shared_grads), (whole, whole_grads) = results
    assert shared.abs().sum() > 0 and torch.equal(shared != 0, batch.response_mask[:, 1:].bool())
    torch.testing.assert_close(shared, whole, rtol=0, atol=1e-12)
    assert (wrap == "adapter_disabled") == (not whole_grads) and len(shared_grads) == len(whole_grads)
    for a, b in zip(shared_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("pooling", list(RewardPooling))
def test_every_reward_pooling_scores_shared_prompts_as_whole_rows(pooling, no_sharing):
    tokenizer = tiny_tokenizer()
    torch.manual_seed(1)
    rm = load_reward_model(tiny_arch(layers=2), tokenizer, pooling).double()
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 80, (n,), generator=generator).tolist() for n in (9, 4, 6)]
    chosen = [torch.randint(5, 80, (n,), generator=generator).tolist() for n in (5, 1, 8)]
    rejected = [torch.randint(5, 80, (n,), generator=generator).tolist() for n in (7, 3, 2)]
    batch = pair_batch(prompts, chosen, rejected, [0, 1, 2], tokenizer.pad_token_id)  # chosen rows, then rejected
    assert shared_prompt_forward(rm, batch) is not None
    shared = score(rm, batch)
    no_sharing()
    torch.testing.assert_close(shared, score(rm, batch), rtol=0, atol=1e-12)


def test_gradient_checkpointing_in_training_runs_whole_rows():
    tokenizer = tiny_tokenizer()
    model = tiny_lm(tokenizer)
    batch = grouped_batch(tokenizer.pad_token_id)
    model.gradient_checkpointing_enable()
    model.train()
    assert shared_prompt_forward(model, batch) is None
    model.eval()
    assert shared_prompt_forward(model, batch) is not None


@pytest.mark.parametrize("stage", [0, 3])
def test_the_game_step_on_an_engine_lands_on_the_same_policy_with_shared_prompts(stage, monkeypatch):
    cfg = game_config()
    cfg.deepspeed = {"zero_optimization": {"stage": stage}}
    generator = torch.Generator().manual_seed(1)
    prompts = [prompt for prompt in torch.randint(3, 300, (8, 9), generator=generator).tolist() for _ in range(4)]
    responses = [torch.randint(3, 300, (int(n),), generator=generator).tolist()
                 for n in torch.randint(1, 8, (32,), generator=generator)]
    advantages = torch.tensor([1.0, -0.5, 0.25, -1.0] * 8)
    before, after = None, []
    for saved in (0.1, 2.0):  # shared prompts, then whole rows
        monkeypatch.setattr(logits_module, "MIN_TOKENS_SAVED", saved)
        tokenizer, policy = tiny_policy(cfg)
        engine, _ = policy_engines(cfg, policy)
        assert engine.zero_optimization_partition_weights() == (stage == 3)
        rollout = collate(prompts, responses, tokenizer.pad_token_id)
        assert (shared_prompt_forward(engine, rollout) is not None) == (saved < 1)
        start = token_logprobs(engine, rollout, 32)
        before = start if before is None else before
        torch.testing.assert_close(start, before, rtol=0, atol=1e-5)
        policy_step(cfg, engine, rollout, None, None, advantages, require_finite=lambda v: None)
        monkeypatch.setattr(logits_module, "MIN_TOKENS_SAVED", 2.0)
        after.append(token_logprobs(engine, rollout, 32))
    assert (after[0] - before).abs().max() > 1e-2  # the step moved the policy
    # Adam's first step is about lr * sign(grad): a gradient within rounding of 0 moves a weight by up to
    # 1e-5 here; a wrong gradient moves it by lr (1e-2).
    torch.testing.assert_close(after[0], after[1], rtol=0, atol=1e-4)
