"""Fit the reward model by Bradley-Terry MLE: minimise -mean log sigma(r(x, y_w) - r(x, y_l)).

The fitted loss L_r(D) is the centre of the confidence set R(D) = {r : L_r(D) <= min L + zeta} that
the min-max stage keeps the RM near (through its beta * L_BT term).

With `variant=white_box` the RM is MM PbKD's Q-function and r is the reward it implies,
r_Q(x, y) = sum_h Q(s_h, a_h) - gamma * E_{a~pi_E} Q(s_{h+1}, a): this is the Q-head pre-training
on the offline preferences that the paper asks for before the white-box game.
"""

from __future__ import annotations

from typing import Callable

from pbkd_cli.config.schema import PbkdConfig, Variant
from pbkd_cli.data.preferences import load_preferences, split_heldout
from pbkd_cli.data.minibatches import Minibatches
from pbkd_cli.data.prompts import TokenBatch, encode_pairs, fit_to_context, pair_batch, pair_examples
from pbkd_cli.engine import build_engine, save_model
from pbkd_cli.io import PbkdError
from pbkd_cli.models.factory import parameter_count
from pbkd_cli.models.lora import with_lora
from pbkd_cli.models.reward import ImpliedRewards, batched_rewards, score
from pbkd_cli.models.roles import load_q_model, load_rm, load_role_tokenizer, load_teacher
from pbkd_cli.objectives.bradley_terry import bradley_terry_loss, pairwise_accuracy
from pbkd_cli.runner import Run


def bt_figures(model, prompts, chosen, rejected, pad_id, batch_size, reward) -> dict[str, float]:
    rc = batched_rewards(model, prompts, chosen, pad_id, batch_size, reward)
    rr = batched_rewards(model, prompts, rejected, pad_id, batch_size, reward)
    return {"bt_loss": bradley_terry_loss(rc, rr).item(), "accuracy": pairwise_accuracy(rc, rr).item(),
            "margin": (rc - rr).mean().item()}


def rm_step(engine, batch: TokenBatch, reward, require_finite: Callable[[float], None]) -> dict[str, float]:
    """The stage's step on one micro-batch of pairs (chosen rows, then rejected): the Bradley-Terry loss
    of `reward(engine, batch)`, backward, then the engine's step. Returns its metrics."""
    chosen, rejected = reward(engine, batch).chunk(2)
    loss = bradley_terry_loss(chosen, rejected)
    require_finite(loss.item())
    engine.backward(loss)
    engine.step()
    return {"bt_loss": loss.item(), "accuracy": pairwise_accuracy(chosen, rejected).item()}


def run(cfg: PbkdConfig, run: Run) -> dict:
    if cfg.train_rm.prefs_path is None:
        raise PbkdError("train_rm.prefs_path: set it to a preference file (collect-prefs writes prefs.jsonl)")
    pairs = load_preferences(cfg.train_rm.prefs_path, "train_rm.prefs_path")
    if cfg.variant == Variant.white_box:
        tokenizer, rm = load_q_model(cfg, load_role_tokenizer(cfg, "student"))
        reward = ImpliedRewards(load_teacher(cfg, tokenizer), len(tokenizer), cfg.minmax.white_box.gamma)
    else:
        tokenizer, rm = load_rm(cfg)
        reward = score
    pairs, overlong = fit_to_context(pairs, pair_examples(pairs), cfg.data, tokenizer, "train-rm pairs")
    heldout, train = split_heldout(pairs, cfg.train_rm.heldout_fraction, cfg.seed)
    prompts, chosen, rejected = encode_pairs(train, cfg.data, tokenizer)
    pad = tokenizer.pad_token_id
    trainer, batch_size = cfg.trainer, cfg.generation.batch_size
    heldout_ids = encode_pairs(heldout, cfg.data, tokenizer) if heldout else None
    engine = build_engine(with_lora(rm, cfg.model.rm.lora, "model.rm"), trainer, cfg.deepspeed)
    # Where the fit starts (on the engine's device, before a resumed checkpoint is loaded): an LM head
    # (pooling=likelihood) or a Q-function's teacher logits already rank pairs, and a fit that ends below
    # its start has made the RM worse.
    mode = engine.module.training
    engine.module.eval()
    start = {"train_accuracy_at_start": bt_figures(engine.module, prompts, chosen, rejected, pad, batch_size, reward)}
    if heldout_ids:
        start["heldout_accuracy_at_start"] = bt_figures(engine.module, *heldout_ids, pad, batch_size, reward)
    start = {key: round(figures["accuracy"], 6) for key, figures in start.items()}
    engine.module.train(mode)
    batches = Minibatches(len(train), min(trainer.micro_batch_size, len(train)), cfg.seed)
    checkpoints, _, steps = run.resumable_steps("train-rm", trainer.max_steps, batches, rm=engine)
    for step in steps:
        for _ in range(trainer.grad_accum):
            batch = pair_batch(prompts, chosen, rejected, next(batches), pad).to(engine.device)
            metrics = rm_step(engine, batch, reward, lambda value: checkpoints.require_finite(value, step))
        if step % trainer.log_every == 0 or step == trainer.max_steps:
            run.tracker.log({**metrics, "lr": engine.get_lr()[0]}, step, prefix="rm/")
        checkpoints.step_done(step, lambda: {"step": step, "batches": batches.state_dict()})

    save_model(engine, tokenizer, run.dir / "model")
    engine.module.eval()
    fit = bt_figures(engine.module, prompts, chosen, rejected, pad, batch_size, reward)
    summary = {
        "prefs_path": str(cfg.train_rm.prefs_path),
        "train_pairs": len(train),
        "trainable_parameters": parameter_count(engine.module, trainable_only=True),
        "overlong_prompts": overlong,
        "heldout_pairs": len(heldout),
        # The MLE loss on the training pairs: the reference level of the confidence set.
        "mle_loss": round(fit["bt_loss"], 6),
        "train_accuracy": round(fit["accuracy"], 6),
        "model_dir": str(run.dir / "model"),
        **start,
    }
    if heldout_ids:
        held = bt_figures(engine.module, *heldout_ids, pad, batch_size, reward)
        summary.update(heldout_accuracy=round(held["accuracy"], 6), heldout_bt_loss=round(held["bt_loss"], 6))
    return summary
