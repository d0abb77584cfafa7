"""The min-max game: min over the student, max over an adversary kept near the preference fit.

    offline PbKD   min_pi  max_{r in R(D)}  J(pi_E, r) - J(pi, r)                        (METHOD.md)
    MM PbKD        min_pi  max_{Q in Q(D)}  E_{tau~pi} sum_h ( E_{a~pi_E} Q(s_h, a) - Q(s_h, a_h) )

The adversary is the part that varies (`game/adversaries.py`): the scalar RM (black box), the
Q-function over the teacher's vocabulary (`variant=white_box`), or, with `minmax.reward=correctness`,
no adversary at all: the control whose reward is whether the answer and every written step are right
(verifiable-reward RL). Each iteration, on a pool of prompts drawn up front:
  1. sample k responses per prompt from the current student (pi_old); with `teacher_in_group` the
     teacher's answer joins each prompt's group, and with `oversample` > 1 the step keeps the prompts
     whose groups the reward tells apart most (those it doubts the teacher on last);
  2. adversary step: gradient ascent on its Lagrangian, the gap between teacher and student minus
     beta times its Bradley-Terry loss on a preference batch (its confidence set) minus reward_l2;
  3. student step: the updated adversary's rewards, advantages against each prompt's group baseline
     (scaled by `advantage_scale`), clipped policy gradient (PPO-style) plus the adversary's own term
     (MM PbKD: on-policy moment matching) plus a KL penalty to the initial (SFT) policy, one optimiser
     step per `rollouts_per_update` rollouts.
The adversary starts at its MLE fit (`train-rm`); student and adversary have separate optimisers. A
game that is one of `minmax.schedule_rounds` rounds (online PbKD) goes on with the previous round's
student optimiser and lr schedule (`minmax.continue_from`) instead of warming up afresh.
"""

from __future__ import annotations

import time
from pathlib import Path

from pbkd_cli.config.schema import Baseline, GameReward, PbkdConfig, Variant
from pbkd_cli.data.prompts import encode_prompts, encode_responses, fit_to_context
from pbkd_cli.engine import save_model
from pbkd_cli.engine.checkpoint import load_engine_state, save_engine_state
from pbkd_cli.game.adversaries import load_adversary
from pbkd_cli.game.figures import (HeldoutAccuracy, answer_accuracy, log_iteration, mean_metrics, positive_on_wrong,
                                   sample_figures, settled)
from pbkd_cli.game.student import (game_prompts, policy_engines, policy_step, prompt_schedule, rollout_batch,
                                   sample_responses, teacher_answers, widest_prompts)
from pbkd_cli.io import PbkdError
from pbkd_cli.models.logits import token_logprobs
from pbkd_cli.models.lora import with_lora
from pbkd_cli.models.roles import load_lm
from pbkd_cli.objectives.policy_gradient import group_advantages, trusted_groups, weigh_negative_advantages
from pbkd_cli.runner import Run


def run(cfg: PbkdConfig, run: Run) -> dict:
    c, trainer = cfg.minmax, cfg.trainer
    examples = game_prompts(cfg)
    tokenizer, policy = load_lm(cfg, "student")
    policy = with_lora(policy, cfg.model.student.lora, "model.student")
    examples, overlong = fit_to_context(examples, examples, cfg.data, tokenizer, "minmax")
    student_prompts = encode_prompts(examples, cfg.data, tokenizer)
    # The prompt pools of the whole game, drawn up front (the teacher answers those alone).
    schedule = prompt_schedule(len(examples), c.prompts_per_iteration * c.oversample, cfg.seed, c.iterations,
                               c.schedule_offset)
    answers = None  # the teacher's, for the RM's gap term and the groups they join
    if c.teacher_in_group or (c.reward == GameReward.rm and cfg.variant == Variant.black_box):
        answers = teacher_answers(cfg, examples, sorted({i for pool in schedule for i in pool}))
    adversary = load_adversary(cfg, examples, answers, tokenizer, policy)
    teacher_rows = {i: encode_responses(t, cfg.data, tokenizer) for i, t in answers.items()} if c.teacher_in_group else None
    k, own = c.group_size(), c.samples_per_prompt
    policy_engine, reference = policy_engines(cfg, policy)
    if c.continue_from:  # the previous round's optimiser moments and place in the one lr schedule
        load_engine_state(policy_engine, Path(c.continue_from) / "student_state", "policy", "minmax.continue_from")
    first_update, schedule_updates = policy_engine.global_steps, c.schedule_rounds * c.student_updates()
    if first_update + c.student_updates() > schedule_updates:
        raise PbkdError(f"minmax.continue_from={c.continue_from}: the game it continues ran {first_update} of the "
                        f"{schedule_updates} updates of minmax.schedule_rounds={c.schedule_rounds} rounds; "
                        f"no room for this round's {c.student_updates()}")
    heldout = HeldoutAccuracy(cfg, tokenizer)

    engines = {"policy": policy_engine, **({adversary.name: adversary.engine} if adversary.engine else {})}
    checkpoints, resumed, iterations = run.resumable_steps("minmax", c.iterations, **engines)
    if resumed:
        adversary.load_state_dict(resumed["adversary"])
    history: list[dict] = resumed.get("history", [])
    # The held-out curve's origin, before the first step: what the game's fall and climb read against.
    heldout_at_start = resumed.get("heldout_at_start")
    if not resumed and heldout.examples:
        heldout_at_start = heldout(policy_engine.module)
        run.tracker.log({"heldout_accuracy": heldout_at_start}, 0, prefix="minmax/")

    started = time.time()
    for iteration in iterations:
        pool = schedule[iteration - 1]
        require_finite = lambda value, what="policy loss": checkpoints.require_finite(value, iteration, what)  # noqa: E731
        clock = time.perf_counter()
        # 1. Student samples from pi_old (with the teacher's answers in each group, if they join it); the
        # game goes on with the prompts_per_iteration prompts of the pool whose groups the reward tells
        # apart most.
        pool_samples, pool_index = sample_responses(cfg, policy_engine, tokenizer, student_prompts, pool)
        pool_groups = (pool_samples.joined([teacher_rows[i] for i in pool], [answers[i] for i in pool])
                       if teacher_rows else pool_samples)
        if c.oversample > 1:
            pool_rewards = adversary.rewards(pool_groups, [i for i in pool for _ in range(k)])
            trusted = (trusted_groups(pool_rewards.reshape(-1, k)[:, own:].mean(1), c.distrusted_fraction)
                       if teacher_rows else None)
            idx, groups, _ = widest_prompts(pool, pool_groups, pool_rewards, c.prompts_per_iteration, trusted)
        else:
            idx, groups = pool, pool_groups
        prompt_index = [i for i in idx for _ in range(k)]
        samples, own_index = groups.head(own), [i for i in idx for _ in range(own)]  # the student's own
        rollout = rollout_batch(groups, tokenizer, policy_engine.device)
        # With one update on the iteration's rollouts, pi_old is the policy that update starts from: the
        # step's own log-probs, detached, are pi_old's, and a forward pass here would only repeat them.
        old_logprobs = (None if c.ppo_epochs * c.updates_per_epoch() == 1 else
                        token_logprobs(policy_engine.module, rollout, trainer.micro_batch_size, adversary.vocab_size,
                                       c.temperature))
        ref_logprobs = (token_logprobs(reference, rollout, trainer.micro_batch_size, adversary.vocab_size,
                                       c.temperature) if reference else None)
        seconds = {"sample": time.perf_counter() - clock}

        clock = time.perf_counter()
        # 2. The adversary's step on the student's own samples, then the rewards it gives as it now stands.
        figures = {"sample/pool_accuracy": answer_accuracy(pool_samples, examples, pool_index),
                   **adversary.step(idx, samples, own_index, rollout, lambda v: require_finite(v, "adversary objective"))}
        rewards = adversary.rewards(groups, prompt_index, rollout)
        seconds["reward_step"] = time.perf_counter() - clock

        clock = time.perf_counter()
        # 3. Student step: clipped policy gradient on the rewards' group advantages (plus the adversary's term).
        advantages = group_advantages(rewards, k, scale=c.advantage_scale.value,
                                      leave_one_out=c.baseline == Baseline.leave_one_out)
        advantages = weigh_negative_advantages(advantages, c.negative_weight).to(policy_engine.device)
        lr = policy_engine.get_lr()[0]  # of the iteration's first update
        pg_metrics = policy_step(cfg, policy_engine, rollout, old_logprobs, ref_logprobs, advantages, require_finite,
                                 vocab_size=adversary.vocab_size, pg_coef=adversary.pg_coef,
                                 student_term=adversary.student_term)
        seconds["policy_step"] = time.perf_counter() - clock

        by_group = rewards.reshape(-1, k)
        figures.update(sample_figures(samples, examples, own_index, by_group[:, :own].reshape(-1)))
        if teacher_rows:
            figures["reward/teacher_minus_student"] = (by_group[:, own:].mean() - by_group[:, :own].mean()).item()
        figures.update({f"pg/{key}": v for key, v in mean_metrics(pg_metrics).items()})
        figures["pg/lr"] = lr
        figures["pg/positive_on_wrong"] = positive_on_wrong(advantages, groups, examples, prompt_index)
        if heldout.due(iteration):
            figures["heldout_accuracy"] = heldout(policy_engine.module)
        history.append(figures)
        log_iteration(run, cfg, iteration, figures, seconds, pool_samples, started)
        checkpoints.step_done(iteration, lambda: {"step": iteration, "history": history,
                                                  "heldout_at_start": heldout_at_start,
                                                  "adversary": adversary.state_dict()})

    save_model(policy_engine, tokenizer, run.dir / "model")
    summary = {"variant": cfg.variant.value, "reward": c.reward.value, "iterations": c.iterations,
               "overlong_prompts": overlong, "student_updates": policy_engine.global_steps - first_update,
               "student_train_sequences": c.student_train_sequences(), "student_samples": c.student_samples(),
               "model_dir": str(run.dir / "model"), "final": settled(history)}
    if heldout_at_start is not None:
        summary["heldout_accuracy_at_start"] = heldout_at_start
    if policy_engine.global_steps < schedule_updates:  # a later round goes on with this optimiser and schedule
        summary["student_state_dir"] = str(save_engine_state(policy_engine, run.dir / "student_state", "policy"))
    if adversary.engine is not None:
        adversary.save(run.dir / "rm")
        summary["rm_dir"] = str(run.dir / "rm")
    return summary
