"""MM PbKD, the white-box game (METHOD.md, "White-box: MM PbKD"): the RM becomes a Q-function.

    min_pi  max_{Q in Q(D)}  E_{tau~pi} sum_h ( sum_a pi_E(a|s_h) Q(s_h, a) - Q(s_h, a_h) )

Q(s, .) is the logits of a causal LM (`model.rm`; the pipeline starts it from the teacher and
pre-trains it on the offline preferences with `train-rm variant=white_box`). Its implied reward
r_Q(s_h, a_h) = Q(s_h, a_h) - gamma * E_{a~pi_E} Q(s_{h+1}, a) gives the preference term.
Each iteration, on a batch of prompts:
  1. sample k responses per prompt from the current student (pi_old); the teacher's
     next-token probabilities on them;
  2. Q step: ascend  moment gap - beta * L_BT(r_Q; preference batch) - reward_l2 * mean moment^2
     (`white_box.expected_student_term`: the gap's student term as sum_a pi_old(a|s_h) Q(s_h, a));
  3. student step: on-policy moment matching (sum_a pi(a|s_h) Q(s_h, a), differentiable in pi)
     plus the clipped policy gradient of the implied sequence reward (group baseline), plus a KL
     penalty to the initial policy; `white_box.moment_matching_coef` and `pg_coef` weigh the two.
"""

from __future__ import annotations

import time

import torch

from pbkd_cli.config.schema import Baseline, PbkdConfig
from pbkd_cli.data.prompts import encode_pairs, encode_prompts, fit_to_context
from pbkd_cli.engine import save_model
from pbkd_cli.objectives.bradley_terry import pairwise_accuracy
from pbkd_cli.objectives.moment_matching import implied_rewards, q_game_objective, student_moment_matching_loss
from pbkd_cli.objectives.policy_gradient import group_advantages, weigh_negative_advantages
from pbkd_cli.runner import Run
from pbkd_cli.stages._game import (HeldoutAccuracy, adversary_engine, game_preferences, game_prompts,
                                   log_iteration, mean_metrics, policy_engines, policy_step, sample_figures,
                                   sample_rollouts, settled, student_train_sequences, token_logprobs)
from pbkd_cli.stages._shared import Minibatches, load_lm
from pbkd_cli.stages._white_box import (ImpliedRewards, load_q_model, load_teacher, next_token_logits,
                                        next_token_probs)
from pbkd_cli.stages.train_rm import pair_batch


def run(cfg: PbkdConfig, run: Run) -> dict:
    c, w, trainer = cfg.minmax, cfg.minmax.white_box, cfg.trainer
    examples, pairs = game_prompts(cfg), game_preferences(cfg)
    tokenizer, policy = load_lm(cfg, "student")
    examples, overlong = fit_to_context(examples, examples, cfg.data, tokenizer, "minmax")
    _, q_model = load_q_model(cfg, tokenizer)
    teacher = load_teacher(cfg, tokenizer)
    vocab, pad = len(tokenizer), tokenizer.pad_token_id
    pair_rewards = ImpliedRewards(teacher, vocab, w.gamma)
    pref_prompts, pref_chosen, pref_rejected = encode_pairs(pairs, cfg.data, tokenizer)
    student_prompts = encode_prompts(examples, cfg.data, tokenizer)

    policy_engine, reference = policy_engines(cfg, policy)
    q_engine = adversary_engine(cfg, q_model)
    heldout = HeldoutAccuracy(cfg, tokenizer)
    device = policy_engine.device

    prompt_batches = Minibatches(len(examples), c.prompts_per_iteration, cfg.seed)
    pref_batches = Minibatches(len(pairs), min(c.rm_pref_batch, len(pairs)), cfg.seed + 1)
    checkpoints = run.checkpoints(policy=policy_engine, q=q_engine)
    resumed = checkpoints.restore()
    if resumed:
        prompt_batches.load_state_dict(resumed["prompt_batches"])
        pref_batches.load_state_dict(resumed["pref_batches"])
    history: list[dict] = resumed.get("history", [])
    first = resumed.get("step", 0) + 1
    started = time.time()
    for iteration in run.tracker.progress(range(first, c.iterations + 1), total=c.iterations - first + 1,
                                          desc="mm-pbkd"):
        idx = next(prompt_batches)
        clock = time.perf_counter()
        # 1. Student samples from pi_old, and the teacher's distribution at every state they visit.
        samples, prompt_index, rollout = sample_rollouts(cfg, policy_engine, tokenizer, student_prompts, idx)
        actions, mask = rollout.input_ids[:, 1:], rollout.response_mask[:, 1:]
        old_logprobs = token_logprobs(policy_engine.module, rollout, trainer.micro_batch_size, vocab, c.temperature)
        ref_logprobs = (token_logprobs(reference, rollout, trainer.micro_batch_size, vocab, c.temperature)
                        if reference else None)
        expert_probs = next_token_probs(teacher, rollout, vocab)
        old_probs = next_token_probs(policy_engine.module, rollout, vocab) if w.expected_student_term else None

        seconds = {"sample": time.perf_counter() - clock}
        clock = time.perf_counter()
        # 2. Q step: gradient ascent on the Lagrangian (a descent on its negative).
        q_engine.train()
        for _ in range(c.rm_steps):
            pref = pair_batch(pref_prompts, pref_chosen, pref_rejected, next(pref_batches), pad).to(device)
            chosen_r, rejected_r = pair_rewards(q_engine, pref).chunk(2)
            loss, q_metrics = q_game_objective(next_token_logits(q_engine, rollout, vocab), expert_probs, actions,
                                               mask, chosen_r, rejected_r, beta=c.beta, reward_l2=c.reward_l2,
                                               student_probs=old_probs)
            checkpoints.require_finite(loss.item(), iteration, "Q objective")
            q_engine.backward(loss)
            q_engine.step()

        seconds["q_step"] = time.perf_counter() - clock
        clock = time.perf_counter()
        # 3. Student step: moment matching against the updated Q, and the PG of its implied reward.
        q_engine.eval()
        with torch.no_grad():
            q_values = next_token_logits(q_engine.module, rollout, vocab)
            rewards = implied_rewards(q_values, expert_probs, actions, mask, w.gamma).float()
        advantages = group_advantages(rewards, c.samples_per_prompt, scale=c.advantage_scale.value,
                                      leave_one_out=c.baseline == Baseline.leave_one_out)
        advantages = weigh_negative_advantages(advantages, c.negative_weight)

        def moment_matching(rows, logits):
            mm_loss = student_moment_matching_loss(q_values[rows], expert_probs[rows], logits, mask[rows])
            return w.moment_matching_coef * mm_loss, {"moment_matching": mm_loss.item()}

        step_metrics = policy_step(cfg, policy_engine, rollout, old_logprobs, ref_logprobs, advantages,
                                   lambda v: checkpoints.require_finite(v, iteration, "policy loss"),
                                   vocab_size=vocab, pg_coef=w.pg_coef, extra_loss=moment_matching)
        seconds["policy_step"] = time.perf_counter() - clock
        figures = {
            **{f"q/{k}": v for k, v in q_metrics.items()},
            "q/pref_accuracy": pairwise_accuracy(chosen_r, rejected_r).item(),
            **{f"pg/{k}": v for k, v in mean_metrics(step_metrics).items()},
            **sample_figures(samples, examples, prompt_index, rewards),
        }
        if heldout.due(iteration):
            figures["heldout_accuracy"] = heldout(policy_engine.module)
        history.append(figures)
        log_iteration(run, cfg, iteration, figures, seconds, samples, started)
        checkpoints.step_done(iteration, lambda: {"step": iteration, "history": history,
                                                  "prompt_batches": prompt_batches.state_dict(),
                                                  "pref_batches": pref_batches.state_dict()})

    save_model(policy_engine, tokenizer, run.dir / "model")
    save_model(q_engine, tokenizer, run.dir / "rm")
    return {"variant": cfg.variant.value, "iterations": c.iterations, "overlong_prompts": overlong,
            "student_updates": policy_engine.global_steps,
            "student_train_sequences": student_train_sequences(cfg),
            "model_dir": str(run.dir / "model"), "rm_dir": str(run.dir / "rm"), "final": settled(history)}
