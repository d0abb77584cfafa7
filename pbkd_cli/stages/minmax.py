"""Offline PbKD: min over the student, max over the reward model kept near the preference fit.

    min_pi  max_{r in R(D)}  J(pi_E, r) - J(pi, r)        (METHOD.md, "Offline PbKD")

Each iteration, on a batch of prompts:
  1. sample k responses per prompt from the current student (pi_old); with `teacher_in_group` the
     teacher's answer joins each prompt's group, and with `oversample` > 1 the step keeps the prompts
     whose groups the reward tells apart most (those it doubts the teacher on last);
  2. RM step: ascend  mean r(x, tau_E) - mean r(x, tau_pi) - beta * L_BT(D) - reward_l2 * mean r^2;
  3. student step: rewards from the updated RM, advantages against the prompt's group baseline
     (scaled by `advantage_scale`), clipped policy gradient (PPO-style) plus a KL penalty to the
     initial (SFT) policy, one optimiser step per `rollouts_per_update` rollouts.
The RM starts at its MLE fit (`train-rm`); policy and RM have separate optimisers.
`minmax.reward=correctness` is the control without an RM: step 2 is skipped and the reward is
whether the answer and every written step are right (verifiable-reward RL).
With `variant=white_box` the game is MM PbKD's (see `mm_pbkd.py`); its RL control is this one.
"""

from __future__ import annotations

import itertools
import time

import torch

from pbkd_cli.config.schema import Baseline, GameReward, PbkdConfig, Variant
from pbkd_cli.data.labelers import correctness_rewards
from pbkd_cli.data.prompts import collate, encode_pairs, encode_prompts, encode_responses, fit_to_context
from pbkd_cli.engine import save_model
from pbkd_cli.models.reward import score
from pbkd_cli.objectives.bradley_terry import pairwise_accuracy, rm_game_objective
from pbkd_cli.objectives.policy_gradient import group_advantages, trusted_groups, weigh_negative_advantages
from pbkd_cli.runner import Run
from pbkd_cli.stages import mm_pbkd
from pbkd_cli.stages._game import (HeldoutAccuracy, adversary_engine, answer_accuracy, game_preferences,
                                   game_prompts, group_size, log_iteration, mean_metrics, policy_engines,
                                   policy_step, positive_on_wrong, rollout_batch, sample_figures,
                                   sample_responses, settled, student_samples, student_train_sequences,
                                   teacher_answers, token_logprobs, widest_prompts)
from pbkd_cli.stages._shared import Minibatches, load_lm, load_rm
from pbkd_cli.stages.train_rm import pair_batch


class RewardModelAdversary:
    """The RM of the game: its engine, the teacher's answers it compares the student's with, and the
    preference pairs its Bradley-Terry term keeps it near."""

    def __init__(self, cfg: PbkdConfig, examples, answers: dict[int, list[str]], student_tokenizer, seed: int):
        c = cfg.minmax
        self.cfg = cfg
        self.tokenizer, rm = load_rm(cfg)
        self.pad = self.tokenizer.pad_token_id
        self.same_vocab = self.tokenizer.get_vocab() == student_tokenizer.get_vocab()
        self.prompts = encode_prompts(examples, cfg.data, self.tokenizer)
        pairs = game_preferences(cfg)
        self.pref_prompts, self.pref_chosen, self.pref_rejected = encode_pairs(pairs, cfg.data, self.tokenizer)
        self.pref_batches = Minibatches(len(pairs), min(c.rm_pref_batch, len(pairs)), seed + 1)
        self.teacher_ids = {i: encode_responses(t, cfg.data, self.tokenizer) for i, t in answers.items()}
        self.engine = adversary_engine(cfg, rm)

    def batch(self, prompt_index: list[int], response_ids: list[list[int]], texts: list[str]):
        """(prompt, response) rows for the RM, reusing the student's ids when the vocabularies match."""
        responses = response_ids if self.same_vocab else encode_responses(texts, self.cfg.data, self.tokenizer)
        return collate([self.prompts[i] for i in prompt_index], responses, self.pad).to(self.engine.device)

    def step(self, idx: list[int], student_batch, require_finite) -> dict[str, float]:
        """Gradient ascent on the Lagrangian (a descent on its negative), `rm_steps` times."""
        c = self.cfg.minmax
        teacher_batch = collate([self.prompts[i] for i in idx for _ in range(c.teacher_samples_per_prompt)],
                                [r for i in idx for r in self.teacher_ids[i]], self.pad).to(self.engine.device)
        self.engine.train()
        for _ in range(c.rm_steps):
            pref = pair_batch(self.pref_prompts, self.pref_chosen, self.pref_rejected, next(self.pref_batches),
                              self.pad).to(self.engine.device)
            chosen, rejected = score(self.engine, pref).chunk(2)
            loss, metrics = rm_game_objective(
                teacher_rewards=score(self.engine, teacher_batch), student_rewards=score(self.engine, student_batch),
                chosen_rewards=chosen, rejected_rewards=rejected, beta=c.beta, reward_l2=c.reward_l2)
            require_finite(loss.item())
            self.engine.backward(loss)
            self.engine.step()
        self.engine.eval()
        return {**{f"rm/{k}": v for k, v in metrics.items()},
                "rm/pref_accuracy": pairwise_accuracy(chosen, rejected).item()}

    @torch.no_grad()
    def rewards(self, student_batch) -> torch.Tensor:
        return score(self.engine.module, student_batch)


def run(cfg: PbkdConfig, run: Run) -> dict:
    c, trainer = cfg.minmax, cfg.trainer
    if cfg.variant == Variant.white_box and c.reward == GameReward.rm:
        return mm_pbkd.run(cfg, run)
    examples = game_prompts(cfg)
    tokenizer, policy = load_lm(cfg, "student")
    examples, overlong = fit_to_context(examples, examples, cfg.data, tokenizer, "minmax")
    student_prompts = encode_prompts(examples, cfg.data, tokenizer)
    # The prompt pools of the whole game, drawn up front (the teacher answers those alone).
    schedule = list(itertools.islice(Minibatches(len(examples), c.prompts_per_iteration * c.oversample, cfg.seed),
                                     c.iterations))
    answers = None  # the teacher's, for the RM's gap term and the groups it joins
    if c.reward == GameReward.rm or c.teacher_in_group:
        answers = teacher_answers(cfg, examples, sorted({i for pool in schedule for i in pool}))
    adversary = RewardModelAdversary(cfg, examples, answers, tokenizer, cfg.seed) if c.reward == GameReward.rm else None
    teacher_rows = {i: encode_responses(t, cfg.data, tokenizer) for i, t in answers.items()} if c.teacher_in_group else None
    k, own = group_size(cfg), c.samples_per_prompt
    policy_engine, reference = policy_engines(cfg, policy)
    heldout = HeldoutAccuracy(cfg, tokenizer)

    engines = {"policy": policy_engine, **({"rm": adversary.engine} if adversary else {})}
    checkpoints = run.checkpoints(**engines)
    resumed = checkpoints.restore()
    if resumed and adversary:
        adversary.pref_batches.load_state_dict(resumed["pref_batches"])
    history: list[dict] = resumed.get("history", [])
    first = resumed.get("step", 0) + 1

    def reward_of(samples, prompt_index) -> torch.Tensor:
        """The reward the student step climbs: the RM's (as it stands) or the verifiable one."""
        if adversary:
            return adversary.rewards(adversary.batch(prompt_index, samples.response_ids, samples.texts)).cpu()
        return torch.tensor(correctness_rewards(samples.texts, [examples[i].answer for i in prompt_index],
                                                cfg.collect_prefs.check_equations))

    started = time.time()
    for iteration in run.tracker.progress(range(first, c.iterations + 1), total=c.iterations - first + 1,
                                          desc="minmax"):
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
            pool_rewards = reward_of(pool_groups, [i for i in pool for _ in range(k)])
            trusted = (trusted_groups(pool_rewards.reshape(-1, k)[:, own:].mean(1), c.distrusted_fraction)
                       if teacher_rows else None)
            idx, groups, rewards = widest_prompts(pool, pool_groups, pool_rewards, c.prompts_per_iteration, trusted)
        else:
            idx, groups, rewards = pool, pool_groups, None
        prompt_index = [i for i in idx for _ in range(k)]
        samples, own_index = groups.head(own), [i for i in idx for _ in range(own)]  # the student's own
        seconds = {"sample": time.perf_counter() - clock}

        clock = time.perf_counter()
        figures = {"sample/pool_accuracy": answer_accuracy(pool_samples, examples, pool_index)}
        if adversary:
            # 2. RM step on the student's own samples, then the updated RM's rewards.
            figures.update(adversary.step(idx, adversary.batch(own_index, samples.response_ids, samples.texts),
                                          lambda v: require_finite(v, "RM objective")))
            rewards = adversary.rewards(adversary.batch(prompt_index, groups.response_ids, groups.texts)).cpu()
        elif rewards is None:
            rewards = reward_of(groups, prompt_index)
        seconds["rm_step"] = time.perf_counter() - clock

        clock = time.perf_counter()
        # 3. Student step: clipped policy gradient on the rewards' group advantages.
        rollout = rollout_batch(groups, tokenizer, policy_engine.device)
        old_logprobs = token_logprobs(policy_engine.module, rollout, trainer.micro_batch_size, temperature=c.temperature)
        ref_logprobs = (token_logprobs(reference, rollout, trainer.micro_batch_size, temperature=c.temperature)
                        if reference else None)
        advantages = group_advantages(rewards, k, scale=c.advantage_scale.value,
                                      leave_one_out=c.baseline == Baseline.leave_one_out)
        advantages = weigh_negative_advantages(advantages, c.negative_weight).to(policy_engine.device)
        pg_metrics = policy_step(cfg, policy_engine, rollout, old_logprobs, ref_logprobs, advantages, require_finite)
        seconds["policy_step"] = time.perf_counter() - clock

        by_group = rewards.reshape(-1, k)
        figures.update(sample_figures(samples, examples, own_index, by_group[:, :own].reshape(-1)))
        if teacher_rows:
            figures["reward/teacher_minus_student"] = (by_group[:, own:].mean() - by_group[:, :own].mean()).item()
        figures.update({f"pg/{k}": v for k, v in mean_metrics(pg_metrics).items()})
        figures["pg/positive_on_wrong"] = positive_on_wrong(advantages, groups, examples, prompt_index)
        if heldout.due(iteration):
            figures["heldout_accuracy"] = heldout(policy_engine.module)
        history.append(figures)
        log_iteration(run, cfg, iteration, figures, seconds, pool_samples, started)
        checkpoints.step_done(iteration, lambda: {
            "step": iteration, "history": history,
            **({"pref_batches": adversary.pref_batches.state_dict()} if adversary else {})})

    save_model(policy_engine, tokenizer, run.dir / "model")
    summary = {"reward": c.reward.value, "iterations": c.iterations, "overlong_prompts": overlong,
               "student_updates": policy_engine.global_steps,
               "student_train_sequences": student_train_sequences(cfg), "student_samples": student_samples(cfg),
               "model_dir": str(run.dir / "model"), "final": settled(history)}
    if adversary:
        save_model(adversary.engine, adversary.tokenizer, run.dir / "rm")
        summary["rm_dir"] = str(run.dir / "rm")
    return summary
