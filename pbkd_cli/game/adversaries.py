"""The max player of the game, the part that varies between its variants. Each adversary

  - `step(idx, own, own_index, rollout, require_finite)`: its move on the iteration's prompts `idx`,
    given the student's own samples (and their rollout batch): gradient ascent on its Lagrangian;
  - `rewards(groups, prompt_index, rollout)`: the sequence rewards the student step climbs, as it
    stands after its step;
  - `student_term`: what it adds to the student's policy-gradient loss (None, or MM PbKD's moment
    matching), and `pg_coef`, `vocab_size`: how the student step weighs and normalises its policy;
  - `name`, `engine`, `state_dict()`: its figures' prefix, its engine and position for checkpoints.

`RewardModel` is black-box PbKD's scalar RM, `QFunction` MM PbKD's Q-function, `VerifiableReward` the
control without an adversary (the answer and every written step checked).
"""

from __future__ import annotations

import dataclasses

import torch

from pbkd_cli.config.schema import GameReward, PbkdConfig, Variant
from pbkd_cli.data.labelers import correctness_rewards
from pbkd_cli.data.minibatches import Minibatches
from pbkd_cli.data.preferences import load_preferences
from pbkd_cli.data.prompts import TokenBatch, collate, encode_pairs, encode_prompts, encode_responses, pair_batch
from pbkd_cli.engine import build_engine, save_model
from pbkd_cli.io import PbkdError
from pbkd_cli.models.logits import next_token_logits, next_token_probs
from pbkd_cli.models.lora import with_lora
from pbkd_cli.models.reward import ImpliedRewards, score
from pbkd_cli.models.roles import load_q_model, load_rm, load_teacher
from pbkd_cli.objectives.bradley_terry import pairwise_accuracy, rm_game_objective
from pbkd_cli.objectives.moment_matching import implied_rewards, q_game_objective, student_moment_matching_loss


def adversary_engine(cfg: PbkdConfig, adversary):
    """The RM's or Q's engine: its own optimiser at `minmax.rm_lr`, one step per `minmax.rm_steps`
    each iteration."""
    c = cfg.minmax
    return build_engine(adversary, dataclasses.replace(
        cfg.trainer, lr=c.rm_lr, grad_accum=1, micro_batch_size=c.prompts_per_iteration,
        max_steps=c.iterations * c.rm_steps, global_batch_size=None), cfg.deepspeed)


def game_preferences(cfg: PbkdConfig):
    """The preference pairs that anchor the adversary (its confidence set)."""
    if cfg.minmax.prefs_path is None:
        raise PbkdError("minmax.prefs_path: set it to the preference file the RM was fitted on")
    return load_preferences(cfg.minmax.prefs_path, "minmax.prefs_path")


class AnchoredAdversary:
    """What the RM and the Q-function share: a trained model on its own engine, and the preference
    pairs whose Bradley-Terry term keeps it in its confidence set, drawn `minmax.rm_pref_batch` at a
    time (their position is its checkpointed state)."""

    def __init__(self, cfg: PbkdConfig, model, tokenizer):
        pairs = game_preferences(cfg)
        self.cfg, self.tokenizer, self.pad = cfg, tokenizer, tokenizer.pad_token_id
        self.pref_ids = encode_pairs(pairs, cfg.data, tokenizer)
        self.pref_batches = Minibatches(len(pairs), min(cfg.minmax.rm_pref_batch, len(pairs)), cfg.seed + 1)
        self.engine = adversary_engine(cfg, model)

    def pref_batch(self) -> TokenBatch:
        return pair_batch(*self.pref_ids, next(self.pref_batches), self.pad).to(self.engine.device)

    def state_dict(self) -> dict:
        return {"pref_batches": self.pref_batches.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.pref_batches.load_state_dict(state["pref_batches"])

    def save(self, directory) -> None:
        save_model(self.engine, self.tokenizer, directory)


class RewardModel(AnchoredAdversary):
    """Black-box PbKD's RM, and the teacher's answers it compares the student's with."""

    name, vocab_size, pg_coef, student_term = "rm", None, 1.0, None

    def __init__(self, cfg: PbkdConfig, examples, answers: dict[int, list[str]], student_tokenizer):
        tokenizer, rm = load_rm(cfg)
        super().__init__(cfg, with_lora(rm, cfg.model.rm.lora, "model.rm"), tokenizer)
        self.same_vocab = tokenizer.get_vocab() == student_tokenizer.get_vocab()
        self.prompts = encode_prompts(examples, cfg.data, tokenizer)
        self.teacher_ids = {i: encode_responses(t, cfg.data, tokenizer) for i, t in answers.items()}

    def responses(self, samples) -> list[list[int]]:
        """The RM's ids of the student's samples: the student's own where the vocabularies match."""
        return samples.response_ids if self.same_vocab else encode_responses(samples.texts, self.cfg.data, self.tokenizer)

    def batch(self, prompt_index: list[int], samples) -> TokenBatch:
        """(prompt, response) rows for the RM."""
        return collate([self.prompts[i] for i in prompt_index], self.responses(samples), self.pad).to(self.engine.device)

    def step(self, idx: list[int], own, own_index: list[int], rollout, require_finite) -> dict[str, float]:
        """Gradient ascent on the Lagrangian (a descent on its negative), `rm_steps` times."""
        c = self.cfg.minmax
        # The teacher's answers and the student's samples of the same prompts in one batch, so that each
        # prompt runs through the RM once (`score` shares it), not once per side.
        teacher_index = [i for i in idx for _ in range(c.teacher_samples_per_prompt)]
        played = collate([self.prompts[i] for i in teacher_index + list(own_index)],
                         [r for i in idx for r in self.teacher_ids[i]] + self.responses(own),
                         self.pad).to(self.engine.device)
        self.engine.train()
        for _ in range(c.rm_steps):
            chosen, rejected = score(self.engine, self.pref_batch()).chunk(2)
            rewards = score(self.engine, played)
            loss, metrics = rm_game_objective(
                teacher_rewards=rewards[:len(teacher_index)], student_rewards=rewards[len(teacher_index):],
                chosen_rewards=chosen, rejected_rewards=rejected, beta=c.beta, reward_l2=c.reward_l2)
            require_finite(loss.item())
            self.engine.backward(loss)
            self.engine.step()
        self.engine.eval()
        return {**{f"rm/{k}": v for k, v in metrics.items()},
                "rm/pref_accuracy": pairwise_accuracy(chosen, rejected).item()}

    @torch.no_grad()
    def rewards(self, groups, prompt_index: list[int], rollout=None) -> torch.Tensor:
        return score(self.engine.module, self.batch(prompt_index, groups)).cpu()


class QFunction(AnchoredAdversary):
    """MM PbKD's Q-function, a causal LM whose logits are `Q(s, .)` over the teacher's vocabulary, and the
    frozen teacher whose next-token probabilities `pi_E(. | s)` it is weighed with.

    Its step ascends  moment gap - beta * L_BT(r_Q; preference batch) - reward_l2 * mean moment^2 on the
    student's rollout (`white_box.expected_student_term`: the gap's student term as
    sum_a pi_old(a|s_h) Q(s_h, a)); its rewards are the implied r_Q of each rollout; its student term is
    on-policy moment matching, sum_a pi(a|s_h) Q(s_h, a), differentiable in pi.
    """

    name = "q"

    def __init__(self, cfg: PbkdConfig, student_tokenizer, policy):
        w = cfg.minmax.white_box
        tokenizer, q_model = load_q_model(cfg, student_tokenizer)  # the student's vocabulary (checked)
        self.teacher = load_teacher(cfg, student_tokenizer)
        super().__init__(cfg, with_lora(q_model, cfg.model.rm.lora, "model.rm"), tokenizer)
        self.policy, self.vocab_size, self.pg_coef = policy, len(student_tokenizer), w.pg_coef
        self.pair_rewards = ImpliedRewards(self.teacher, self.vocab_size, w.gamma)
        self._expert: tuple[TokenBatch, torch.Tensor] | None = None
        self._q_values = None

    def rollout(self, samples) -> TokenBatch:
        """The samples' (prompt, response) rows, in the student's vocabulary (which the Q shares)."""
        return collate(samples.prompt_ids, samples.response_ids, self.pad).to(self.engine.device)

    def expert_probs(self, rollout: TokenBatch) -> torch.Tensor:
        """pi_E(. | s_h) at every state of the rollout, computed once per rollout."""
        if self._expert is None or self._expert[0] is not rollout:
            self._expert = rollout, next_token_probs(self.teacher, rollout, self.vocab_size)
        return self._expert[1]

    def step(self, idx: list[int], own, own_index: list[int], rollout: TokenBatch, require_finite) -> dict[str, float]:
        c, w = self.cfg.minmax, self.cfg.minmax.white_box
        if rollout.input_ids.shape[0] != len(own.response_ids):  # the teacher's answers joined the groups
            rollout = self.rollout(own)
        actions, mask = rollout.input_ids[:, 1:], rollout.response_mask[:, 1:]
        expert = self.expert_probs(rollout)
        old_probs = next_token_probs(self.policy, rollout, self.vocab_size) if w.expected_student_term else None
        self.engine.train()
        for _ in range(c.rm_steps):
            chosen, rejected = self.pair_rewards(self.engine, self.pref_batch()).chunk(2)
            loss, metrics = q_game_objective(next_token_logits(self.engine, rollout, self.vocab_size), expert,
                                             actions, mask, chosen, rejected, beta=c.beta, reward_l2=c.reward_l2,
                                             student_probs=old_probs)
            require_finite(loss.item())
            self.engine.backward(loss)
            self.engine.step()
        self.engine.eval()
        return {**{f"q/{k}": v for k, v in metrics.items()}, "q/pref_accuracy": pairwise_accuracy(chosen, rejected).item()}

    @torch.no_grad()
    def rewards(self, groups, prompt_index: list[int], rollout: TokenBatch | None = None) -> torch.Tensor:
        """The implied rewards of the rollout (of `groups`, built here when not given); their Q-values
        are kept for the student term."""
        if rollout is None:
            rollout = self.rollout(groups)
        expert = self.expert_probs(rollout)
        self._q_values = next_token_logits(self.engine.module, rollout, self.vocab_size)
        return implied_rewards(self._q_values, expert, rollout.input_ids[:, 1:], rollout.response_mask[:, 1:],
                               self.cfg.minmax.white_box.gamma).float()

    def student_term(self, rows: slice, logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Moment matching against the Q-values of the rollout just rewarded, on its rows `rows`."""
        rollout = self._expert[0]
        mm_loss = student_moment_matching_loss(self._q_values[rows], self._expert[1][rows], logits,
                                               rollout.response_mask[rows, 1:])
        return self.cfg.minmax.white_box.moment_matching_coef * mm_loss, {"moment_matching": mm_loss.item()}


class VerifiableReward:
    """The control without an adversary: reward 1 where the answer and every written step are right
    (`collect_prefs.check_equations`), 0 elsewhere: what a perfect reward model could give."""

    name, engine, vocab_size, pg_coef, student_term = "verifiable", None, None, 1.0, None

    def __init__(self, cfg: PbkdConfig, examples):
        self.cfg, self.examples = cfg, examples

    def step(self, idx, own, own_index, rollout, require_finite) -> dict[str, float]:
        return {}

    def rewards(self, groups, prompt_index: list[int], rollout=None) -> torch.Tensor:
        return torch.tensor(correctness_rewards(groups.texts, [self.examples[i].answer for i in prompt_index],
                                                self.cfg.collect_prefs.check_equations))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def load_adversary(cfg: PbkdConfig, examples, answers, student_tokenizer, policy):
    """The adversary `minmax.reward` and `variant` ask for (`policy`: the student, whose pi_old the
    Q-function's step reads)."""
    if cfg.minmax.reward == GameReward.correctness:
        return VerifiableReward(cfg, examples)
    if cfg.variant == Variant.white_box:
        return QFunction(cfg, student_tokenizer, policy)
    return RewardModel(cfg, examples, answers, student_tokenizer)
