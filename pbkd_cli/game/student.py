"""The student's side of the game: the prompts it visits, its rollouts, and its step (a clipped policy
gradient with a KL penalty to where it started)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Callable

import torch

from pbkd_cli.config.schema import PbkdConfig
from pbkd_cli.data.answers import read_answers
from pbkd_cli.data.minibatches import Minibatches
from pbkd_cli.data.prompts import TokenBatch, collate
from pbkd_cli.data.tasks import load_examples
from pbkd_cli.engine import build_engine
from pbkd_cli.generation import generate
from pbkd_cli.generation.hf import Samples
from pbkd_cli.generation.sampler import ResponseSampler
from pbkd_cli.io import PbkdError
from pbkd_cli.models.logits import next_token_logits, response_logprobs
from pbkd_cli.models.lora import AdapterDisabled, is_lora
from pbkd_cli.objectives.policy_gradient import clipped_policy_gradient_loss, kl_penalty, sequence_logprobs, widest_groups


def game_prompts(cfg: PbkdConfig):
    """The train prompts the game visits."""
    c = cfg.minmax
    end = None if c.num_prompts is None else c.prompt_offset + c.num_prompts
    examples = load_examples(cfg.data, "train")[c.prompt_offset:end]
    if len(examples) < c.prompts_per_iteration * c.oversample:
        raise PbkdError(f"minmax.prompts_per_iteration={c.prompts_per_iteration}: x minmax.oversample={c.oversample} "
                        f"prompts per iteration, only {len(examples)} prompts")
    return examples


def prompt_schedule(num_prompts: int, pool_size: int, seed: int, iterations: int, offset: int = 0) -> list[list[int]]:
    """The prompt pools of a game's iterations: pools offset .. offset + iterations - 1 of the seed's one
    shuffled schedule, so that games played one after another (online rounds) visit the prompts one
    long game would, not the first pools again."""
    return list(itertools.islice(Minibatches(num_prompts, pool_size, seed), offset, offset + iterations))


def teacher_answers(cfg: PbkdConfig, examples, visited: list[int]) -> dict[int, list[str]]:
    """The teacher's answers to the prompts the game may visit, `minmax.teacher_samples_per_prompt` each:
    read from `minmax.teacher_answers_path`, or sampled once up front (the teacher does not change), so
    that its weights are freed before the game."""
    c = cfg.minmax
    if c.teacher_answers_path is None:
        texts = ResponseSampler(cfg, "teacher").sample([examples[i] for i in visited], c.teacher_samples_per_prompt,
                                                       c.teacher_temperature)
        return dict(zip(visited, texts))
    answers = read_answers(c.teacher_answers_path, "minmax.teacher_answers_path", [examples[i] for i in visited],
                           c.teacher_samples_per_prompt)
    return dict(zip(visited, answers))


def policy_engines(cfg: PbkdConfig, policy):
    """The student's engine (its own optimiser [paper]) and the frozen initial policy the KL penalty
    refers to (None without a KL penalty).

    The engine's batch is `minmax.rollouts_per_update` rollouts (the schema refuses a `trainer.grad_accum`
    or `trainer.global_batch_size` of its own for the game) and its schedule spans the updates of
    `minmax.schedule_rounds` such games, `iterations x ppo_epochs x updates per epoch` each, in place of
    `trainer.max_steps`."""
    c, trainer = cfg.minmax, cfg.trainer
    per_update = c.rollouts_per_update or c.rollouts()
    lora = is_lora(policy)
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if c.kl_coef > 0 and not lora else None
    engine = build_engine(policy, dataclasses.replace(
        trainer, grad_accum=per_update // trainer.micro_batch_size,
        max_steps=c.schedule_rounds * c.student_updates()), cfg.deepspeed)
    if c.kl_coef > 0 and lora:  # the start is the base with the adapters off: no second copy
        return engine, AdapterDisabled(engine.module)
    if reference is not None:
        reference.config.use_cache = False  # forward passes only
        reference.to(engine.device)
    return engine, reference


def sample_responses(cfg: PbkdConfig, policy_engine, tokenizer, student_prompts, idx) -> tuple[Samples, list[int]]:
    """k samples per prompt from pi_old, and the prompt of each."""
    c = cfg.minmax
    samples = generate(policy_engine.module, tokenizer, [student_prompts[i] for i in idx],
                       num_samples=c.samples_per_prompt, temperature=c.temperature,
                       top_p=cfg.generation.top_p, max_new_tokens=cfg.data.max_response_tokens,
                       batch_size=cfg.generation.batch_size)
    return samples, [i for i in idx for _ in range(c.samples_per_prompt)]


def widest_prompts(pool: list[int], samples: Samples, rewards: torch.Tensor, keep: int,
                   eligible: torch.Tensor | None = None):
    """The `keep` prompts of `pool` whose samples' rewards spread most (`eligible` ones first): (their
    indices, their samples, their rewards), each in the same order (the student step pairs the i-th
    sample with the i-th reward)."""
    kept = widest_groups(rewards, samples.num_samples, keep, eligible)
    return [pool[g] for g in kept], samples.groups(kept), rewards.reshape(-1, samples.num_samples)[kept].reshape(-1)


def rollout_batch(samples, tokenizer, device) -> TokenBatch:
    return collate(samples.prompt_ids, samples.response_ids, tokenizer.pad_token_id).to(device)


StudentTerm = Callable[[slice, torch.Tensor], tuple[torch.Tensor, dict]]


def policy_step(cfg: PbkdConfig, engine, rollout: TokenBatch, old_logprobs: torch.Tensor | None,
                ref_logprobs: torch.Tensor | None, advantages: torch.Tensor, require_finite: Callable[[float], None],
                vocab_size: int | None = None, pg_coef: float = 1.0,
                student_term: StudentTerm | None = None) -> list[dict]:
    """The student step [paper: PPO-style clipped policy gradient]: `ppo_epochs` passes over the
    iteration's rollouts, one optimiser step per `rollouts_per_update` of them.

    Per micro-batch the loss is `pg_coef * clipped PG + kl_coef * KL(pi || pi_ref)` plus
    `student_term(rows, logits)` when given (MM PbKD's moment matching). Log-probabilities are those of
    the sampling policy softmax(logits / minmax.temperature), as `old_logprobs` must be too; None
    means the rollouts were sampled from the weights this step starts from and it takes one optimiser
    step on them (ppo_epochs 1, one update), so pi_old's log-probs are the step's own, detached.
    Returns each micro-batch's metrics.
    """
    c, micro = cfg.minmax, cfg.trainer.micro_batch_size
    actions, mask = rollout.input_ids[:, 1:], rollout.response_mask[:, 1:]
    metrics_list = []
    for _ in range(c.ppo_epochs):
        for start in range(0, actions.shape[0], micro):
            rows = slice(start, start + micro)
            if student_term is None:
                logprobs = response_logprobs(engine, rollout.rows(rows), vocab_size, c.temperature)
            else:  # the term reads the logits at every response position
                logits = next_token_logits(engine, rollout.rows(rows), vocab_size)
                logprobs = sequence_logprobs(logits / c.temperature, actions[rows], mask[rows])
            old = logprobs.detach() if old_logprobs is None else old_logprobs[rows]
            pg_loss, metrics = clipped_policy_gradient_loss(logprobs, old, advantages[rows], mask[rows], c.clip_eps)
            loss = pg_coef * pg_loss
            if student_term is not None:
                term, term_metrics = student_term(rows, logits)
                loss = loss + term
                metrics.update(term_metrics)
            if ref_logprobs is not None:
                kl = kl_penalty(logprobs, ref_logprobs[rows], mask[rows])
                loss = loss + c.kl_coef * kl
                metrics["kl"] = kl.item()
            require_finite(loss.item())
            engine.backward(loss)
            engine.step()
            metrics_list.append(metrics)
    return metrics_list
