"""Preference optimisation of a policy on (prompt, chosen, rejected) pairs: DPO, conservative DPO, IPO.

    min_pi  E_(x, y_w, y_l) ~ D  loss(h),   h = log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x)

1. pi_ref is the policy as it starts (`dpo.model`'s weights); the log-probs it gives every pair's
   responses are computed once, before training, and the copy is freed;
2. each step: the policy's log-probs of a minibatch of pairs, the loss of their margins
   (`objectives.preference_optimization`; `sft_weight` adds the chosen answers' NLL, RPO), one
   optimiser step;
3. on the held-out pairs: how often the implicit reward beta * log(pi/pi_ref) ranks chosen over rejected.
Pairs follow TRL's convention (prompt / chosen / rejected; `collect-prefs` writes them). In the
pipeline it is DPKD's preference stage (the teacher's answers preferred over the student's) and
Proxy-KD's alignment of its proxy to the teacher.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from pbkd_cli.config.schema import DPOConfig, PbkdConfig
from pbkd_cli.data.preferences import load_preferences, split_heldout
from pbkd_cli.data.minibatches import Minibatches
from pbkd_cli.data.prompts import encode_pairs, fit_to_context, pair_batch, pair_examples
from pbkd_cli.engine import build_engine, save_model
from pbkd_cli.io import PbkdError
from pbkd_cli.models.lora import with_lora
from pbkd_cli.models.roles import load_lm
from pbkd_cli.objectives.preference_optimization import preference_optimization_loss, response_logprob_sums
from pbkd_cli.runner import Run

log = logging.getLogger("pbkd")


def pair_logprobs(model, prompts, chosen, rejected, idx, pad_id, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`log pi(chosen | prompt)` and `log pi(rejected | prompt)` of the pairs `idx`, `[len(idx)]` each."""
    batch = pair_batch(prompts, chosen, rejected, idx, pad_id).to(device)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return response_logprob_sums(logits, batch.input_ids, batch.response_mask).chunk(2)


def lengths(responses: list[list[int]]) -> torch.Tensor:
    return torch.tensor([len(r) for r in responses], dtype=torch.float32)


@torch.no_grad()
def all_pair_logprobs(model, prompts, chosen, rejected, pad_id, batch_size, device) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    parts = [pair_logprobs(model, prompts, chosen, rejected, list(range(start, min(start + batch_size, len(prompts)))),
                           pad_id, device) for start in range(0, len(prompts), batch_size)]
    return torch.cat([c for c, _ in parts]).cpu(), torch.cat([r for _, r in parts]).cpu()


def dpo_step(engine, c: DPOConfig, pairs, idx: list[int], reference, chosen_tokens: torch.Tensor, pad_id: int,
             require_finite: Callable[[float], None]) -> dict[str, float]:
    """The stage's step on the pairs `idx` of `pairs` (prompt, chosen, rejected ids): the preference-
    optimisation loss of their log-probabilities against the reference's (`reference`: chosen, rejected
    log-probs of every pair), backward, then the engine's step. Returns its figures."""
    chosen, rejected = pair_logprobs(engine, *pairs, idx, pad_id, engine.device)
    loss, figures = preference_optimization_loss(
        chosen, rejected, reference[0][idx].to(chosen), reference[1][idx].to(chosen),
        beta=c.beta, loss=c.loss.value, label_smoothing=c.label_smoothing,
        sft_weight=c.sft_weight, chosen_tokens=chosen_tokens[idx].to(chosen))
    require_finite(loss.item())
    engine.backward(loss)
    engine.step()
    return figures


def run(cfg: PbkdConfig, run: Run) -> dict:
    c, trainer = cfg.dpo, cfg.trainer
    if c.prefs_path is None:
        raise PbkdError("dpo.prefs_path: set it to a preference file (collect-prefs writes prefs.jsonl)")
    pairs = load_preferences(c.prefs_path, "dpo.prefs_path")
    tokenizer, policy = load_lm(cfg, c.model.value)
    pairs, overlong = fit_to_context(pairs, pair_examples(pairs), cfg.data, tokenizer, "dpo pairs")
    heldout, train = split_heldout(pairs, c.heldout_fraction, cfg.seed)
    if not train:
        raise PbkdError(f"dpo.heldout_fraction={c.heldout_fraction}: no pair of {len(pairs)} is left to train on")
    identical = sum(p.chosen == p.rejected for p in train)
    if identical:
        # teacher_preferred pairs a teacher answer with the student's even where both wrote the same.
        log.warning("dpo: %d of %d training pairs have chosen == rejected and carry no signal", identical, len(train))
    pad, score_batch = tokenizer.pad_token_id, cfg.generation.batch_size
    train_ids = encode_pairs(train, cfg.data, tokenizer)
    chosen_tokens = lengths(train_ids[1])
    heldout_ids = encode_pairs(heldout, cfg.data, tokenizer) if heldout else None

    # 1. The reference: the policy as it starts, scored once on every pair before its first step (no copy).
    engine = build_engine(with_lora(policy, getattr(cfg.model, c.model.value).lora, f"model.{c.model.value}"),
                          trainer, cfg.deepspeed)
    ref_train = all_pair_logprobs(engine.module, *train_ids, pad, score_batch, engine.device)
    ref_heldout = all_pair_logprobs(engine.module, *heldout_ids, pad, score_batch, engine.device) if heldout else None
    engine.train()

    batches = Minibatches(len(train), min(trainer.micro_batch_size, len(train)), cfg.seed)
    checkpoints, _, steps = run.resumable_steps("dpo", trainer.max_steps, batches, policy=engine)
    figures = {}
    # 2. Steps on the margins of minibatches of pairs.
    for step in steps:
        for _ in range(trainer.grad_accum):
            figures = dpo_step(engine, c, train_ids, next(batches), ref_train, chosen_tokens, pad,
                               lambda value: checkpoints.require_finite(value, step))
        if step % trainer.log_every == 0 or step == trainer.max_steps:
            run.tracker.log({**figures, "lr": engine.get_lr()[0]}, step, prefix="dpo/")
        checkpoints.step_done(step, lambda: {"step": step, "batches": batches.state_dict()})

    save_model(engine, tokenizer, run.dir / "model")
    summary = {
        "model": c.model.value, "prefs_path": str(c.prefs_path), "loss": c.loss.value, "beta": c.beta,
        "train_pairs": len(train), "identical_pairs": identical, "heldout_pairs": len(heldout),
        "overlong_prompts": overlong,
        "steps": trainer.max_steps,
        # The budget a compute-matched baseline gets: each pair trains on two sequences.
        "train_sequences": 2 * trainer.max_steps * engine.train_batch_size(),
        "final": {k: round(v, 6) for k, v in figures.items()},
        "model_dir": str(run.dir / "model"),
    }
    if heldout:
        # 3. The implicit reward on pairs it never trained on.
        chosen, rejected = all_pair_logprobs(engine.module, *heldout_ids, pad, score_batch, engine.device)
        _, held = preference_optimization_loss(chosen, rejected, *ref_heldout, beta=c.beta, loss=c.loss.value,
                                               label_smoothing=c.label_smoothing, sft_weight=c.sft_weight,
                                               chosen_tokens=lengths(heldout_ids[1]))
        summary.update(heldout_reward_accuracy=round(held["reward_accuracy"], 6),
                       heldout_reward_margin=round(held["reward_margin"], 6),
                       heldout_chosen_logprob_change=round(held["chosen_reward"] / c.beta, 6))
    return summary
