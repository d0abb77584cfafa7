"""Offline PbKD: min over the student, max over the reward model kept near the preference fit.

    min_pi  max_{r in R(D)}  J(pi_E, r) - J(pi, r)        (METHOD.md, "Offline PbKD")

Each iteration, on a batch of prompts:
  1. sample k responses per prompt from the current student (pi_old);
  2. RM step: ascend  mean r(x, tau_E) - mean r(x, tau_pi) - beta * L_BT(D) - reward_l2 * mean r^2;
  3. student step: rewards from the updated RM, advantages against the prompt's group baseline,
     clipped policy gradient (PPO-style) plus a KL penalty to the initial (SFT) policy.
The RM starts at its MLE fit (`train-rm`); policy and RM have separate optimisers.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time

import torch

from pbkd_cli.config.schema import Baseline, PbkdConfig
from pbkd_cli.data.gsm8k import extract_answer
from pbkd_cli.data.preferences import load_preferences
from pbkd_cli.data.prompts import collate, encode_pairs, encode_prompts, encode_responses
from pbkd_cli.data.tasks import load_examples
from pbkd_cli.engine import build_engine, save_model
from pbkd_cli.generation import generate
from pbkd_cli.io import PbkdError
from pbkd_cli.models.reward import score
from pbkd_cli.objectives.bradley_terry import pairwise_accuracy, rm_game_objective
from pbkd_cli.objectives.policy_gradient import (clipped_policy_gradient_loss, group_advantages, kl_penalty,
                                                 sequence_logprobs)
from pbkd_cli.runner import Run
from pbkd_cli.stages._shared import ResponseSampler, load_lm, load_rm, minibatches

log = logging.getLogger("pbkd")


@torch.no_grad()
def token_logprobs(model, batch, micro_batch_size: int) -> torch.Tensor:
    """log pi(a_t | s_t) of every response token of `batch` ([B, T-1], zero off the response)."""
    out = []
    for start in range(0, batch.input_ids.shape[0], micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        logits = model(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows]).logits
        out.append(sequence_logprobs(logits[:, :-1], batch.input_ids[rows, 1:], batch.response_mask[rows, 1:]))
    return torch.cat(out)


class RewardInputs:
    """Encodes (prompt, response) rows for the RM, reusing the student's ids when the vocabularies match."""

    def __init__(self, cfg: PbkdConfig, examples, rm_tokenizer, student_tokenizer):
        self.cfg, self.tokenizer = cfg, rm_tokenizer
        self.prompts = encode_prompts(examples, cfg.data, rm_tokenizer)
        self.same_vocab = rm_tokenizer.get_vocab() == student_tokenizer.get_vocab()

    def batch(self, prompt_index: list[int], response_ids: list[list[int]], texts: list[str]):
        responses = response_ids if self.same_vocab else encode_responses(texts, self.cfg.data, self.tokenizer)
        return collate([self.prompts[i] for i in prompt_index], responses, self.tokenizer.pad_token_id)


def run(cfg: PbkdConfig, run: Run) -> dict:
    c, trainer = cfg.minmax, cfg.trainer
    if c.prefs_path is None:
        raise PbkdError("minmax.prefs_path: set it to the preference file the RM was fitted on")
    rollouts = c.prompts_per_iteration * c.samples_per_prompt
    if rollouts % trainer.micro_batch_size:
        raise PbkdError(f"trainer.micro_batch_size={trainer.micro_batch_size} must divide "
                        f"minmax.prompts_per_iteration * minmax.samples_per_prompt = {rollouts}")
    end = None if c.num_prompts is None else c.prompt_offset + c.num_prompts
    examples = load_examples(cfg.data, "train")[c.prompt_offset:end]
    if len(examples) < c.prompts_per_iteration:
        raise PbkdError(f"minmax.prompts_per_iteration={c.prompts_per_iteration}: only {len(examples)} prompts")
    pairs = load_preferences(c.prefs_path, "minmax.prefs_path")

    tokenizer, policy = load_lm(cfg, "student")
    rm_tokenizer, rm = load_rm(cfg)
    reward_inputs = RewardInputs(cfg, examples, rm_tokenizer, tokenizer)
    pad, rm_pad = tokenizer.pad_token_id, rm_tokenizer.pad_token_id

    # Teacher responses tau_E for every prompt, sampled once: the teacher does not change.
    k_teacher = c.teacher_samples_per_prompt
    teacher_texts = ResponseSampler(cfg, "teacher").sample(examples, k_teacher, c.temperature)
    teacher_ids = [encode_responses(texts, cfg.data, rm_tokenizer) for texts in teacher_texts]
    pref_prompts, pref_chosen, pref_rejected = encode_pairs(pairs, cfg.data, rm_tokenizer)
    student_prompts = encode_prompts(examples, cfg.data, tokenizer)

    reference = copy.deepcopy(policy).eval().requires_grad_(False) if c.kl_coef > 0 else None
    policy_engine = build_engine(policy, dataclasses.replace(
        trainer, grad_accum=rollouts // trainer.micro_batch_size, max_steps=c.iterations * c.ppo_epochs),
        cfg.deepspeed)
    rm_engine = build_engine(rm, dataclasses.replace(
        trainer, lr=c.rm_lr, grad_accum=1, micro_batch_size=c.prompts_per_iteration,
        max_steps=c.iterations * c.rm_steps), cfg.deepspeed)
    if reference is not None:
        reference.to(policy_engine.device)
    device = policy_engine.device

    prompt_batches = minibatches(len(examples), c.prompts_per_iteration, cfg.seed)
    pref_batches = minibatches(len(pairs), min(c.rm_pref_batch, len(pairs)), cfg.seed + 1)
    history: list[dict] = []
    started = time.time()
    for iteration in run.tracker.progress(range(1, c.iterations + 1), total=c.iterations, desc="minmax"):
        idx = next(prompt_batches)
        clock = time.perf_counter()
        # 1. Student samples from pi_old.
        samples = generate(policy_engine.module, tokenizer, [student_prompts[i] for i in idx],
                           num_samples=c.samples_per_prompt, temperature=c.temperature,
                           top_p=cfg.generation.top_p, max_new_tokens=cfg.data.max_response_tokens,
                           batch_size=cfg.generation.batch_size)
        prompt_index = [i for i in idx for _ in range(c.samples_per_prompt)]
        rollout = collate(samples.prompt_ids, samples.response_ids, pad).to(device)
        old_logprobs = token_logprobs(policy_engine.module, rollout, trainer.micro_batch_size)
        ref_logprobs = token_logprobs(reference, rollout, trainer.micro_batch_size) if reference else None
        student_rm_batch = reward_inputs.batch(prompt_index, samples.response_ids, samples.texts).to(device)
        teacher_rm_batch = collate([reward_inputs.prompts[i] for i in idx for _ in range(k_teacher)],
                                   [r for i in idx for r in teacher_ids[i]], rm_pad).to(device)

        seconds = {"sample": time.perf_counter() - clock}
        clock = time.perf_counter()
        # 2. RM step: gradient ascent on the Lagrangian (a descent on its negative).
        rm_engine.train()
        for _ in range(c.rm_steps):
            pb = next(pref_batches)
            pref_rows = [pref_prompts[i] for i in pb]
            pref = collate(pref_rows + pref_rows, [pref_chosen[i] for i in pb] + [pref_rejected[i] for i in pb],
                           rm_pad).to(device)
            chosen_r, rejected_r = score(rm_engine, pref).chunk(2)
            loss, rm_metrics = rm_game_objective(
                teacher_rewards=score(rm_engine, teacher_rm_batch),
                student_rewards=score(rm_engine, student_rm_batch),
                chosen_rewards=chosen_r, rejected_rewards=rejected_r, beta=c.beta, reward_l2=c.reward_l2)
            rm_engine.backward(loss)
            rm_engine.step()

        seconds["rm_step"] = time.perf_counter() - clock
        clock = time.perf_counter()
        # 3. Student step: clipped policy gradient on the updated RM's rewards.
        rm_engine.eval()
        with torch.no_grad():
            rewards = score(rm_engine.module, student_rm_batch)
        advantages = group_advantages(rewards, c.samples_per_prompt, normalize_std=c.normalize_advantages,
                                      leave_one_out=c.baseline == Baseline.leave_one_out)
        pg_metrics = []
        for _ in range(c.ppo_epochs):
            for start in range(0, rollouts, trainer.micro_batch_size):
                rows = slice(start, start + trainer.micro_batch_size)
                logits = policy_engine(input_ids=rollout.input_ids[rows],
                                       attention_mask=rollout.attention_mask[rows]).logits
                mask = rollout.response_mask[rows, 1:]
                logprobs = sequence_logprobs(logits[:, :-1], rollout.input_ids[rows, 1:], mask)
                loss, metrics = clipped_policy_gradient_loss(logprobs, old_logprobs[rows], advantages[rows],
                                                             mask, c.clip_eps)
                if reference is not None:
                    kl = kl_penalty(logprobs, ref_logprobs[rows], mask)
                    loss = loss + c.kl_coef * kl
                    metrics["kl"] = kl.item()
                policy_engine.backward(loss)
                policy_engine.step()
                pg_metrics.append(metrics)

        seconds["policy_step"] = time.perf_counter() - clock
        correct = [extract_answer(t) == examples[i].answer for t, i in zip(samples.texts, prompt_index)]
        figures = {
            **{f"rm/{k}": v for k, v in rm_metrics.items()},
            "rm/pref_accuracy": pairwise_accuracy(chosen_r, rejected_r).item(),
            **{f"pg/{k}": sum(m[k] for m in pg_metrics) / len(pg_metrics) for k in pg_metrics[0]},
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item(),
            "sample/length": samples.generated_tokens / len(samples.response_ids),
            "sample/accuracy": sum(correct) / len(correct),
            "sample/finished": sum(samples.finished) / len(samples.finished),
        }
        history.append(figures)
        if iteration % trainer.log_every == 0 or iteration == c.iterations:
            timing = {f"time/{k}": v for k, v in seconds.items()}
            timing["time/sample_tokens_per_second"] = samples.generated_tokens / seconds["sample"]
            run.tracker.log({**figures, **timing, "time/elapsed": time.time() - started}, iteration,
                            prefix="minmax/")

    save_model(policy_engine, tokenizer, run.dir / "model")
    save_model(rm_engine, rm_tokenizer, run.dir / "rm")
    tail = history[-max(1, len(history) // 5):]  # the last fifth of the game, where it has settled
    summary = {key: round(sum(h[key] for h in tail) / len(tail), 6) for key in tail[0]}
    return {"iterations": c.iterations, "model_dir": str(run.dir / "model"), "rm_dir": str(run.dir / "rm"),
            "final": summary}
