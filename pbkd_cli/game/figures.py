"""What the game reports: the held-out accuracy it steers by, figures of each iteration's samples and
reward, and the settled figures of its summary."""

from __future__ import annotations

import time

import torch

from pbkd_cli.config.schema import PbkdConfig
from pbkd_cli.data.gsm8k import extract_answer
from pbkd_cli.data.prompts import encode_prompts
from pbkd_cli.data.tasks import load_examples
from pbkd_cli.generation import generate
from pbkd_cli.objectives.bradley_terry import within_group_accuracy


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
