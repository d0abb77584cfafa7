"""Offline PbKD: min over the student, max over the reward model kept near the preference fit.

    min_pi  max_{r in R(D)}  J(pi_E, r) - J(pi, r)        (METHOD.md, "Offline PbKD")

Each iteration, on a batch of prompts:
  1. sample k responses per prompt from the current student (pi_old);
  2. RM step: ascend  mean r(x, tau_E) - mean r(x, tau_pi) - beta * L_BT(D) - reward_l2 * mean r^2;
  3. student step: rewards from the updated RM, advantages against the prompt's group baseline,
     clipped policy gradient (PPO-style) plus a KL penalty to the initial (SFT) policy.
The RM starts at its MLE fit (`train-rm`); policy and RM have separate optimisers.
With `variant=white_box` the game is MM PbKD's (see `mm_pbkd.py`).
"""

from __future__ import annotations

import itertools
import logging
import time

import torch

from pbkd_cli.config.schema import Baseline, PbkdConfig, Variant
from pbkd_cli.data.prompts import collate, encode_pairs, encode_prompts, encode_responses, fit_to_context
from pbkd_cli.engine import save_model
from pbkd_cli.models.reward import score
from pbkd_cli.objectives.bradley_terry import pairwise_accuracy, rm_game_objective
from pbkd_cli.objectives.policy_gradient import (clipped_policy_gradient_loss, group_advantages, kl_penalty,
                                                 sequence_logprobs)
from pbkd_cli.runner import Run
from pbkd_cli.stages import mm_pbkd
from pbkd_cli.stages._game import (game_data, game_engines, log_iteration, mean_metrics, sample_figures,
                                   sample_rollouts, settled, token_logprobs)
from pbkd_cli.stages._shared import Minibatches, ResponseSampler, load_lm, load_rm

log = logging.getLogger("pbkd")


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
    if cfg.variant == Variant.white_box:
        return mm_pbkd.run(cfg, run)
    c, trainer = cfg.minmax, cfg.trainer
    examples, pairs = game_data(cfg)
    rollouts = c.prompts_per_iteration * c.samples_per_prompt

    tokenizer, policy = load_lm(cfg, "student")
    examples, overlong = fit_to_context(examples, examples, cfg.data, tokenizer, "minmax")
    rm_tokenizer, rm = load_rm(cfg)
    reward_inputs = RewardInputs(cfg, examples, rm_tokenizer, tokenizer)
    rm_pad = rm_tokenizer.pad_token_id

    # The prompt batches of the whole game are drawn up front, so that the teacher answers only the
    # prompts the game visits, once each: the teacher does not change.
    schedule = list(itertools.islice(Minibatches(len(examples), c.prompts_per_iteration, cfg.seed), c.iterations))
    visited = sorted({i for idx in schedule for i in idx})
    k_teacher = c.teacher_samples_per_prompt
    teacher_texts = ResponseSampler(cfg, "teacher").sample([examples[i] for i in visited], k_teacher, c.temperature)
    teacher_ids = {i: encode_responses(texts, cfg.data, rm_tokenizer) for i, texts in zip(visited, teacher_texts)}
    pref_prompts, pref_chosen, pref_rejected = encode_pairs(pairs, cfg.data, rm_tokenizer)
    student_prompts = encode_prompts(examples, cfg.data, tokenizer)

    policy_engine, rm_engine, reference = game_engines(cfg, policy, rm)
    device = policy_engine.device

    pref_batches = Minibatches(len(pairs), min(c.rm_pref_batch, len(pairs)), cfg.seed + 1)
    checkpoints = run.checkpoints(policy=policy_engine, rm=rm_engine)
    resumed = checkpoints.restore()
    if resumed:
        pref_batches.load_state_dict(resumed["pref_batches"])
    history: list[dict] = resumed.get("history", [])
    first = resumed.get("step", 0) + 1
    started = time.time()
    for iteration in run.tracker.progress(range(first, c.iterations + 1), total=c.iterations - first + 1,
                                          desc="minmax"):
        idx = schedule[iteration - 1]
        clock = time.perf_counter()
        # 1. Student samples from pi_old.
        samples, prompt_index, rollout = sample_rollouts(cfg, policy_engine, tokenizer, student_prompts, idx)
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
            checkpoints.require_finite(loss.item(), iteration, "RM objective")
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
                checkpoints.require_finite(loss.item(), iteration, "policy loss")
                policy_engine.backward(loss)
                policy_engine.step()
                pg_metrics.append(metrics)

        seconds["policy_step"] = time.perf_counter() - clock
        figures = {
            **{f"rm/{k}": v for k, v in rm_metrics.items()},
            "rm/pref_accuracy": pairwise_accuracy(chosen_r, rejected_r).item(),
            **{f"pg/{k}": v for k, v in mean_metrics(pg_metrics).items()},
            **sample_figures(samples, examples, prompt_index, rewards),
        }
        history.append(figures)
        log_iteration(run, cfg, iteration, figures, seconds, samples, started)
        checkpoints.step_done(iteration, lambda: {"step": iteration, "pref_batches": pref_batches.state_dict(),
                                                  "history": history})

    save_model(policy_engine, tokenizer, run.dir / "model")
    save_model(rm_engine, rm_tokenizer, run.dir / "rm")
    return {"iterations": c.iterations, "overlong_prompts": overlong, "model_dir": str(run.dir / "model"), "rm_dir": str(run.dir / "rm"),
            "final": settled(history)}
