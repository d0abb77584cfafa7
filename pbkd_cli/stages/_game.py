"""The loop pieces both min-max games share (black-box PbKD in `minmax.py`, MM PbKD in `mm_pbkd.py`):
their data, their two engines, sampling the student's rollouts, and the figures they report."""

from __future__ import annotations

import copy
import dataclasses
import time

import torch

from pbkd_cli.config.schema import PbkdConfig
from pbkd_cli.data.gsm8k import extract_answer
from pbkd_cli.data.preferences import load_preferences
from pbkd_cli.data.prompts import collate
from pbkd_cli.data.tasks import load_examples
from pbkd_cli.engine import build_engine
from pbkd_cli.generation import generate
from pbkd_cli.io import PbkdError
from pbkd_cli.objectives.policy_gradient import sequence_logprobs


@torch.no_grad()
def token_logprobs(model, batch, micro_batch_size: int, vocab_size: int | None = None) -> torch.Tensor:
    """log pi(a_t | s_t) of every response token of `batch` ([B, T-1], zero off the response), over
    the first `vocab_size` logits when given (the white-box game normalises over the tokenizer's)."""
    out = []
    for start in range(0, batch.input_ids.shape[0], micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        logits = model(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows]).logits
        out.append(sequence_logprobs(logits[:, :-1, :vocab_size], batch.input_ids[rows, 1:],
                                     batch.response_mask[rows, 1:]))
    return torch.cat(out)


def game_data(cfg: PbkdConfig):
    """The prompts the game visits and the preference pairs that anchor the adversary."""
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
    return examples, load_preferences(c.prefs_path, "minmax.prefs_path")


def game_engines(cfg: PbkdConfig, policy, adversary):
    """Separate optimisers for the student (descent) and the RM or Q (ascent) [paper], plus the frozen
    initial policy the KL penalty refers to."""
    c, trainer = cfg.minmax, cfg.trainer
    rollouts = c.prompts_per_iteration * c.samples_per_prompt
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if c.kl_coef > 0 else None
    # The game sets its own batches (rollouts per iteration), so trainer.global_batch_size does not apply.
    policy_engine = build_engine(policy, dataclasses.replace(
        trainer, grad_accum=rollouts // trainer.micro_batch_size, max_steps=c.iterations * c.ppo_epochs,
        global_batch_size=None),
        cfg.deepspeed)
    adversary_engine = build_engine(adversary, dataclasses.replace(
        trainer, lr=c.rm_lr, grad_accum=1, micro_batch_size=c.prompts_per_iteration,
        max_steps=c.iterations * c.rm_steps, global_batch_size=None), cfg.deepspeed)
    if reference is not None:
        reference.config.use_cache = False  # forward passes only
        reference.to(policy_engine.device)
    return policy_engine, adversary_engine, reference


def sample_rollouts(cfg: PbkdConfig, policy_engine, tokenizer, student_prompts, idx):
    """k samples per prompt from pi_old, as one right-padded batch, and the prompt of each row."""
    c = cfg.minmax
    samples = generate(policy_engine.module, tokenizer, [student_prompts[i] for i in idx],
                       num_samples=c.samples_per_prompt, temperature=c.temperature,
                       top_p=cfg.generation.top_p, max_new_tokens=cfg.data.max_response_tokens,
                       batch_size=cfg.generation.batch_size)
    prompt_index = [i for i in idx for _ in range(c.samples_per_prompt)]
    rollout = collate(samples.prompt_ids, samples.response_ids, tokenizer.pad_token_id).to(policy_engine.device)
    return samples, prompt_index, rollout


def sample_figures(samples, examples, prompt_index, rewards: torch.Tensor) -> dict[str, float]:
    correct = [extract_answer(t) == examples[i].answer for t, i in zip(samples.texts, prompt_index)]
    return {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item(),
        "sample/length": samples.generated_tokens / len(samples.response_ids),
        "sample/accuracy": sum(correct) / len(correct),
        "sample/finished": sum(samples.finished) / len(samples.finished),
    }


def mean_metrics(metrics: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(m[key] for m in metrics) / len(metrics) for key in metrics[0]}


def log_iteration(run, cfg: PbkdConfig, iteration: int, figures: dict, seconds: dict, samples, started: float):
    """Every `trainer.log_every` iterations and at the last: the figures and where the time went."""
    if iteration % cfg.trainer.log_every and iteration != cfg.minmax.iterations:
        return
    timing = {f"time/{k}": v for k, v in seconds.items()}
    timing["time/sample_tokens_per_second"] = samples.generated_tokens / seconds["sample"]
    run.tracker.log({**figures, **timing, "time/elapsed": time.time() - started}, iteration, prefix="minmax/")


def settled(history: list[dict]) -> dict[str, float]:
    """Mean figures over the last fifth of the game, where it has settled."""
    tail = history[-max(1, len(history) // 5):]
    return {key: round(sum(h[key] for h in tail) / len(tail), 6) for key in tail[0]}
