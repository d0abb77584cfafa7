"""The loop pieces both min-max games share (black-box PbKD in `minmax.py`, MM PbKD in `mm_pbkd.py`):
their data, their engines, sampling the student's rollouts, the student's policy-gradient step, the
held-out accuracy and the figures they report."""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Callable

import torch

from pbkd_cli.config.schema import GameReward, PbkdConfig, Variant
from pbkd_cli.data.gsm8k import extract_answer
from pbkd_cli.data.preferences import load_preferences
from pbkd_cli.data.prompts import TokenBatch, collate, encode_prompts
from pbkd_cli.data.tasks import load_examples
from pbkd_cli.engine import build_engine
from pbkd_cli.generation import generate
from pbkd_cli.generation.hf import Samples
from pbkd_cli.io import PbkdError, read_jsonl
from pbkd_cli.objectives.bradley_terry import within_group_accuracy
from pbkd_cli.objectives.policy_gradient import (clipped_policy_gradient_loss, kl_penalty, sequence_logprobs,
                                                 widest_groups)
from pbkd_cli.stages._shared import ResponseSampler


@torch.no_grad()
def token_logprobs(model, batch, micro_batch_size: int, vocab_size: int | None = None,
                   temperature: float = 1.0) -> torch.Tensor:
    """log pi_T(a_t | s_t) of every response token of `batch` ([B, T-1], zero off the response), over
    the first `vocab_size` logits when given (the white-box game normalises over the tokenizer's).

    pi_T = softmax(logits / temperature) is the policy the game samples from, so it is the one whose
    probabilities the policy gradient and its ratios use."""
    out = []
    for start in range(0, batch.input_ids.shape[0], micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        logits = model(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows]).logits
        out.append(sequence_logprobs(logits[:, :-1, :vocab_size] / temperature, batch.input_ids[rows, 1:],
                                     batch.response_mask[rows, 1:]))
    return torch.cat(out)


def group_size(cfg: PbkdConfig) -> int:
    """Responses per prompt in the student step: its own samples, and the teacher's answers when they
    join the group (`minmax.teacher_in_group`)."""
    c = cfg.minmax
    return c.samples_per_prompt + (c.teacher_samples_per_prompt if c.teacher_in_group else 0)


def rollouts_per_update(cfg: PbkdConfig) -> int:
    """Rollouts behind one optimiser step of the student: a PPO minibatch of the iteration's rollouts."""
    c, micro = cfg.minmax, cfg.trainer.micro_batch_size
    rollouts = c.prompts_per_iteration * group_size(cfg)
    per_update = c.rollouts_per_update or rollouts
    if rollouts % per_update or per_update % micro:
        raise PbkdError(f"minmax.rollouts_per_update={per_update}: must divide the iteration's rollouts "
                        f"(prompts_per_iteration x {group_size(cfg)} responses per group = {rollouts}) and be a "
                        f"multiple of trainer.micro_batch_size={micro}")
    return per_update


def check_game(cfg: PbkdConfig) -> None:
    """The game's settings that need only the config, checked before any model loads (one line each)."""
    c = cfg.minmax
    rollouts_per_update(cfg)
    if c.oversample < 1:
        raise PbkdError(f"minmax.oversample={c.oversample}: prompts sampled per prompt trained on, >= 1")
    if c.oversample > 1 and cfg.variant == Variant.white_box and c.reward == GameReward.rm:
        raise PbkdError(f"minmax.oversample={c.oversample}: MM PbKD trains on every prompt it samples; "
                        "oversampling is for the black-box game and its RL control")
    if c.negative_weight < 0:
        raise PbkdError(f"minmax.negative_weight={c.negative_weight}: a weight on negative advantages, >= 0")
    if c.teacher_in_group and cfg.variant == Variant.white_box and c.reward == GameReward.rm:
        raise PbkdError("minmax.teacher_in_group=true: MM PbKD's student step is on its own samples; the "
                        "teacher's answers join the groups of the black-box game and its RL control")
    if c.distrusted_fraction > 0 and not (c.teacher_in_group and c.oversample > 1):
        raise PbkdError(f"minmax.distrusted_fraction={c.distrusted_fraction}: it orders the oversampled pool by the "
                        "teacher's answers' reward; set minmax.teacher_in_group=true and minmax.oversample > 1")
    if c.teacher_temperature == 0 and c.teacher_samples_per_prompt != 1:
        raise PbkdError(f"minmax.teacher_samples_per_prompt={c.teacher_samples_per_prompt}: greedy teacher "
                        "answers (minmax.teacher_temperature=0) give one per prompt")


def student_train_sequences(cfg: PbkdConfig) -> int:
    """The game's budget for a compute-matched baseline: sequences the student is trained on."""
    c = cfg.minmax
    return c.iterations * c.prompts_per_iteration * group_size(cfg) * c.ppo_epochs


def student_samples(cfg: PbkdConfig) -> int:
    """Sequences the student samples over the game (`oversample` times those it is trained on per epoch)."""
    c = cfg.minmax
    return c.iterations * c.prompts_per_iteration * c.oversample * c.samples_per_prompt


def game_prompts(cfg: PbkdConfig):
    """The train prompts the game visits (after `check_game`: the first thing both games do)."""
    c = cfg.minmax
    check_game(cfg)
    end = None if c.num_prompts is None else c.prompt_offset + c.num_prompts
    examples = load_examples(cfg.data, "train")[c.prompt_offset:end]
    if len(examples) < c.prompts_per_iteration * c.oversample:
        raise PbkdError(f"minmax.prompts_per_iteration={c.prompts_per_iteration}: x minmax.oversample={c.oversample} "
                        f"prompts per iteration, only {len(examples)} prompts")
    return examples


def game_preferences(cfg: PbkdConfig):
    """The preference pairs that anchor the adversary (its confidence set)."""
    if cfg.minmax.prefs_path is None:
        raise PbkdError("minmax.prefs_path: set it to the preference file the RM was fitted on")
    return load_preferences(cfg.minmax.prefs_path, "minmax.prefs_path")


def policy_engines(cfg: PbkdConfig, policy):
    """The student's engine (its own optimiser [paper]) and the frozen initial policy the KL penalty
    refers to (None without a KL penalty)."""
    c, trainer = cfg.minmax, cfg.trainer
    rollouts = c.prompts_per_iteration * group_size(cfg)
    per_update = rollouts_per_update(cfg)
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if c.kl_coef > 0 else None
    # One optimiser step per minibatch of rollouts, ppo_epochs passes per iteration.
    engine = build_engine(policy, dataclasses.replace(
        trainer, grad_accum=per_update // trainer.micro_batch_size,
        max_steps=c.iterations * c.ppo_epochs * (rollouts // per_update), global_batch_size=None), cfg.deepspeed)
    if reference is not None:
        reference.config.use_cache = False  # forward passes only
        reference.to(engine.device)
    return engine, reference


def adversary_engine(cfg: PbkdConfig, adversary):
    """The RM's or Q's engine: gradient ascent on the Lagrangian with its own optimiser and lr."""
    c = cfg.minmax
    return build_engine(adversary, dataclasses.replace(
        cfg.trainer, lr=c.rm_lr, grad_accum=1, micro_batch_size=c.prompts_per_iteration,
        max_steps=c.iterations * c.rm_steps, global_batch_size=None), cfg.deepspeed)


def sample_responses(cfg: PbkdConfig, policy_engine, tokenizer, student_prompts, idx) -> tuple[Samples, list[int]]:
    """k samples per prompt from pi_old, and the prompt of each."""
    c = cfg.minmax
    samples = generate(policy_engine.module, tokenizer, [student_prompts[i] for i in idx],
                       num_samples=c.samples_per_prompt, temperature=c.temperature,
                       top_p=cfg.generation.top_p, max_new_tokens=cfg.data.max_response_tokens,
                       batch_size=cfg.generation.batch_size)
    return samples, [i for i in idx for _ in range(c.samples_per_prompt)]


def sample_rollouts(cfg: PbkdConfig, policy_engine, tokenizer, student_prompts, idx):
    """k samples per prompt from pi_old, as one right-padded batch, and the prompt of each row."""
    samples, prompt_index = sample_responses(cfg, policy_engine, tokenizer, student_prompts, idx)
    return samples, prompt_index, rollout_batch(samples, tokenizer, policy_engine.device)


def teacher_answers(cfg: PbkdConfig, examples, visited: list[int]) -> dict[int, list[str]]:
    """The teacher's answers to the prompts the game may visit, `minmax.teacher_samples_per_prompt` each:
    read from `minmax.teacher_answers_path`, or sampled once up front (the teacher does not change), so
    that its weights are freed before the game."""
    c = cfg.minmax
    if c.teacher_answers_path is None:
        texts = ResponseSampler(cfg, "teacher").sample([examples[i] for i in visited], c.teacher_samples_per_prompt,
                                                       c.teacher_temperature)
        return dict(zip(visited, texts))
    by_id: dict[str, list[str]] = {}
    for row in read_jsonl(c.teacher_answers_path, "minmax.teacher_answers_path"):
        by_id.setdefault(str(row.get("id")), []).append(str(row.get("response", "")))
    answers = {}
    for i in visited:
        found = by_id.get(examples[i].id, [])
        if len(found) != c.teacher_samples_per_prompt:
            raise PbkdError(f"minmax.teacher_answers_path={c.teacher_answers_path}: {len(found)} answers for prompt "
                            f"{examples[i].id}, minmax.teacher_samples_per_prompt={c.teacher_samples_per_prompt}")
        answers[i] = found
    return answers


def widest_prompts(pool: list[int], samples: Samples, rewards: torch.Tensor, keep: int,
                   eligible: torch.Tensor | None = None):
    """The `keep` prompts of `pool` whose samples' rewards spread most (`eligible` ones first): (their
    indices, their samples, their rewards), each in the same order (the student step pairs the i-th
    sample with the i-th reward)."""
    kept = widest_groups(rewards, samples.num_samples, keep, eligible)
    return [pool[g] for g in kept], samples.groups(kept), rewards.reshape(-1, samples.num_samples)[kept].reshape(-1)


def rollout_batch(samples, tokenizer, device) -> TokenBatch:
    return collate(samples.prompt_ids, samples.response_ids, tokenizer.pad_token_id).to(device)


def policy_step(cfg: PbkdConfig, engine, rollout: TokenBatch, old_logprobs: torch.Tensor,
                ref_logprobs: torch.Tensor | None, advantages: torch.Tensor, require_finite: Callable[[float], None],
                vocab_size: int | None = None, pg_coef: float = 1.0,
                extra_loss: Callable[[slice, torch.Tensor], tuple[torch.Tensor, dict]] | None = None) -> list[dict]:
    """The student step [paper: PPO-style clipped policy gradient]: `ppo_epochs` passes over the
    iteration's rollouts, one optimiser step per `rollouts_per_update` of them.

    Per micro-batch the loss is `pg_coef * clipped PG + kl_coef * KL(pi || pi_ref)` plus
    `extra_loss(rows, logits)` when given (MM PbKD's moment matching). Log-probabilities are those of
    the sampling policy softmax(logits / minmax.temperature), as `old_logprobs` must be too.
    Returns each micro-batch's metrics.
    """
    c, micro = cfg.minmax, cfg.trainer.micro_batch_size
    actions, mask = rollout.input_ids[:, 1:], rollout.response_mask[:, 1:]
    metrics_list = []
    for _ in range(c.ppo_epochs):
        for start in range(0, actions.shape[0], micro):
            rows = slice(start, start + micro)
            logits = engine(input_ids=rollout.input_ids[rows], attention_mask=rollout.attention_mask[rows]).logits
            logits = logits[:, :-1, :vocab_size]
            logprobs = sequence_logprobs(logits / c.temperature, actions[rows], mask[rows])
            pg_loss, metrics = clipped_policy_gradient_loss(logprobs, old_logprobs[rows], advantages[rows],
                                                            mask[rows], c.clip_eps)
            loss = pg_coef * pg_loss
            if extra_loss is not None:
                term, extra_metrics = extra_loss(rows, logits)
                loss = loss + term
                metrics.update(extra_metrics)
            if ref_logprobs is not None:
                kl = kl_penalty(logprobs, ref_logprobs[rows], mask[rows])
                loss = loss + c.kl_coef * kl
                metrics["kl"] = kl.item()
            require_finite(loss.item())
            engine.backward(loss)
            engine.step()
            metrics_list.append(metrics)
    return metrics_list


class HeldoutAccuracy:
    """Greedy exact match on a fixed subset of the test split (the first `minmax.eval_prompts`)."""

    def __init__(self, cfg: PbkdConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.examples = load_examples(cfg.data, "test")[:cfg.minmax.eval_prompts] if cfg.minmax.eval_every else []
        self.prompts = encode_prompts(self.examples, cfg.data, tokenizer) if self.examples else []

    def due(self, iteration: int) -> bool:
        every = self.cfg.minmax.eval_every
        return bool(self.examples) and (iteration % every == 0 or iteration == self.cfg.minmax.iterations)

    def __call__(self, model) -> float:
        samples = generate(model, self.tokenizer, self.prompts, num_samples=1, temperature=0.0,
                           max_new_tokens=self.cfg.data.max_response_tokens,
                           batch_size=self.cfg.generation.batch_size)
        return sum(extract_answer(t) == ex.answer for t, ex in zip(samples.texts, self.examples)) / len(self.examples)


def answers_right(samples, examples, prompt_index) -> list[bool]:
    return [extract_answer(t) == examples[i].answer for t, i in zip(samples.texts, prompt_index)]


def answer_accuracy(samples, examples, prompt_index) -> float:
    correct = answers_right(samples, examples, prompt_index)
    return sum(correct) / len(correct)


def sample_figures(samples, examples, prompt_index, rewards: torch.Tensor) -> dict[str, float]:
    """Figures of the iteration's samples; `reward/right_over_wrong` (where some group holds both a right
    and a wrong answer) says whether the reward ranks the student's own samples the way the gold
    answers do: the signal the student step gets."""
    correct = answers_right(samples, examples, prompt_index)
    figures = {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item(),
        "sample/length": samples.generated_tokens / len(samples.response_ids),
        "sample/accuracy": sum(correct) / len(correct),
        "sample/finished": sum(samples.finished) / len(samples.finished),
        # Prompts whose samples the reward tells apart at all: the only ones with a policy gradient.
        "sample/informative_prompts": (rewards.reshape(-1, samples.num_samples).std(1, correction=0) > 0)
        .float().mean().item(),
    }
    order = within_group_accuracy(rewards.cpu(), torch.tensor(correct), samples.num_samples)
    if order is not None:
        figures["reward/right_over_wrong"] = order
    return figures


def positive_on_wrong(advantages: torch.Tensor, samples, examples, prompt_index) -> float:
    """The share of the step's positive advantage that goes to wrong answers (gold-checked; a figure to
    steer by, not used in training): what a reward's mistakes cost a filtered update."""
    wrong = ~torch.tensor(answers_right(samples, examples, prompt_index))
    push_up = advantages.detach().cpu().clamp_min(0)
    return (push_up[wrong].sum() / push_up.sum().clamp_min(1e-12)).item()


def mean_metrics(metrics: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(m[key] for m in metrics) / len(metrics) for key in metrics[0]}


def log_iteration(run, cfg: PbkdConfig, iteration: int, figures: dict, seconds: dict, samples, started: float):
    """Every `trainer.log_every` iterations, at the last, and whenever the held-out accuracy was
    measured: the figures and where the time went."""
    if iteration % cfg.trainer.log_every and iteration != cfg.minmax.iterations and "heldout_accuracy" not in figures:
        return
    timing = {f"time/{k}": v for k, v in seconds.items()}
    timing["time/sample_tokens_per_second"] = samples.generated_tokens / seconds["sample"]
    run.tracker.log({**figures, **timing, "time/elapsed": time.time() - started}, iteration, prefix="minmax/")


def settled(history: list[dict]) -> dict[str, float]:
    """Mean figures over the last fifth of the game, where it has settled, each over the iterations that
    have it (the held-out accuracy: its last measurement)."""
    tail = history[-max(1, len(history) // 5):]
    keys = dict.fromkeys(k for h in tail for k in h if k != "heldout_accuracy")
    out = {}
    for key in keys:
        values = [h[key] for h in tail if key in h]
        out[key] = round(sum(values) / len(values), 6)
    measured = [h["heldout_accuracy"] for h in history if "heldout_accuracy" in h]
    if measured:
        out["heldout_accuracy"] = measured[-1]
    return out
