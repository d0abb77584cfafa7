#!/usr/bin/env python
"""The game's student iteration against one step of TRL's GRPOTrainer, side by side in one process.

Both sides start from the same tiny Llama policy and score with the same value-head reward model (a
`LlamaForSequenceClassification` read at the last token, built from the same config), on the same
prompts of the demo's task, in the same order: per iteration P prompts x G samples at temperature 1
and top-p 1, at most --max-new-tokens tokens each, the RM's reward of every sample, group-normalised
advantages, a KL penalty to the frozen start with coefficient --beta (k3 estimator on both sides),
and one optimiser step on all P*G rollouts (micro batch M, gradient accumulation P*G/M), AdamW at
the same lr, betas, weight decay and clipping, float32, no gradient checkpointing.

  ours  what `stages/minmax.py` runs per iteration for the student (`game/student.py`): HF generate
        with the KV cache (`sample_responses`), the RM's scores (`models/reward.score` in batches),
        `group_advantages(scale="group")`, the reference's log-probs, `policy_step` on a DeepSpeed
        engine (ZeRO stage 0, world size 1) wrapping torch AdamW;
  TRL   GRPOTrainer (num_generations=G, per_device_train_batch_size=M, gradient_accumulation_steps=
        P*G/M, so one generation of P*G completions per optimiser step, num_iterations=1), reward_funcs
        = [the RM], in the HF Trainer through accelerate as one plain process.

The game's adversary step (the RM's own update, PbKD only) has no counterpart in GRPO and is not in
either side: `scripts/bench/vs_trl.py --only rm` measures that step against TRL's RewardTrainer.

The two sides alternate iteration by iteration (ours runs from TRL's step-end callback, outside its
clock), so both see the same machine load. s/iteration is the median over the iterations after the
--warmup first ones. Untrained models rarely emit EOS, so nearly every completion on both sides is
--max-new-tokens long (the mean lengths are printed): the same work per iteration.

    OMP_NUM_THREADS=2 python scripts/bench/game_vs_grpo.py [--iterations 8] [--warmup 2] [--prompts 16]
        [--group 4] [--micro-batch 32] [--max-new-tokens 48] [--hidden 128] [--layers 4] [--beta 0.01]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_trl import PhaseClock, Run, _sync, _trl_optim, _version, alternating, plain_process, quiet  # noqa: E402

from pbkd_cli.config.compose import compose, to_typed  # noqa: E402
from pbkd_cli.config.schema import ModelConfig, RewardPooling, TinyLlamaConfig  # noqa: E402
from pbkd_cli.data.minibatches import Minibatches  # noqa: E402
from pbkd_cli.data.prompts import encode_prompts, fit_to_context, format_prompt  # noqa: E402
from pbkd_cli.data.tasks import load_examples, tokenizer_corpus  # noqa: E402
from pbkd_cli.engine import distributed_context  # noqa: E402
from pbkd_cli.game.student import policy_engines, policy_step, rollout_batch, sample_responses  # noqa: E402
from pbkd_cli.models import build_bpe_tokenizer, load_causal_lm  # noqa: E402
from pbkd_cli.models.factory import parameter_count  # noqa: E402
from pbkd_cli.models.logits import token_logprobs  # noqa: E402
from pbkd_cli.models.reward import batched_rewards, load_reward_model  # noqa: E402
from pbkd_cli.objectives.policy_gradient import group_advantages  # noqa: E402


def game_config(opts):
    """The demo's game settings with the bench's sizes: one update per iteration on all its rollouts."""
    cfg = to_typed(compose(["stage=minmax", "+exp=demo"]))
    cfg.trainer = dataclasses.replace(cfg.trainer, micro_batch_size=opts.micro_batch, warmup_ratio=0.0,
                                      log_every=10**9)
    cfg.minmax = dataclasses.replace(
        cfg.minmax, iterations=opts.warmup + opts.iterations, prompts_per_iteration=opts.prompts,
        samples_per_prompt=opts.group, oversample=1, teacher_in_group=False, distrusted_fraction=0.0,
        rollouts_per_update=None, ppo_epochs=1, temperature=1.0, kl_coef=opts.beta, negative_weight=1.0)
    cfg.data = dataclasses.replace(cfg.data, max_response_tokens=opts.max_new_tokens)
    cfg.generation = dataclasses.replace(cfg.generation, batch_size=opts.prompts * opts.group, top_p=1.0)
    return cfg


class OurGame:
    """The student's side of a game iteration, one per `step()`."""

    def __init__(self, cfg, tokenizer, policy, rm, prompts, schedule):
        self.cfg, self.tokenizer, self.rm, self.prompts, self.schedule = cfg, tokenizer, rm, prompts, schedule
        self.engine, self.reference = policy_engines(cfg, policy)
        self.run = Run()
        self.clock = PhaseClock(self.run)
        self.engine.backward = self.clock.wrap("backward", self.engine.backward)
        self.engine.step = self.clock.wrap("optimizer step", self.engine.step)
        self.lengths: list[float] = []

    def step(self) -> None:
        cfg, c, clock = self.cfg, self.cfg.minmax, self.clock
        done = len(self.run.durations)
        clock.active = done >= self.warmup
        micro, pad = cfg.trainer.micro_batch_size, self.tokenizer.pad_token_id
        _sync()
        start = time.perf_counter()
        with clock("generate"):
            samples, _ = sample_responses(cfg, self.engine, self.tokenizer, self.prompts, self.schedule[done])
        with clock("reward"):
            rewards = batched_rewards(self.rm, samples.prompt_ids, samples.response_ids, pad, micro)
        with clock("reference"):
            rollout = rollout_batch(samples, self.tokenizer, self.engine.device)
            ref = token_logprobs(self.reference, rollout, micro, None, c.temperature) if self.reference else None
        advantages = group_advantages(rewards, c.samples_per_prompt, scale="group").to(self.engine.device)
        with clock("policy step"):
            policy_step(cfg, self.engine, rollout, None, ref, advantages, require_finite=lambda v: None)
        _sync()
        self.run.durations.append(time.perf_counter() - start)
        self.run.tokens.append(int(rollout.response_mask.sum()))
        self.lengths.append(statistics.fmean(len(r) for r in samples.response_ids))


def run_grpo(opts, cfg, tokenizer, policy, rm, prompt_texts, ours: OurGame, tmp: str) -> tuple[Run, list[float]]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [i for pool in ours.schedule for i in pool]
    trainer_cfg, rollouts = cfg.trainer, opts.prompts * opts.group
    args = GRPOConfig(
        output_dir=tmp, max_steps=len(ours.schedule), per_device_train_batch_size=opts.micro_batch,
        gradient_accumulation_steps=rollouts // opts.micro_batch, num_generations=opts.group,
        max_completion_length=opts.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=opts.beta,
        num_iterations=1, scale_rewards="group", epsilon=cfg.minmax.clip_eps, loss_type="grpo",
        shuffle_dataset=False, learning_rate=trainer_cfg.lr, weight_decay=trainer_cfg.weight_decay,
        adam_beta1=trainer_cfg.adam_betas[0], adam_beta2=trainer_cfg.adam_betas[1],
        max_grad_norm=trainer_cfg.max_grad_norm, lr_scheduler_type=trainer_cfg.lr_schedule.value, warmup_steps=0,
        gradient_checkpointing=False, logging_strategy="steps", logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0, bf16=False, fp16=False,
        use_cpu=not torch.cuda.is_available(), seed=cfg.seed)
    # Each prompt G times in a row, as GRPO's sampler repeats them; in the order our schedule visits them.
    data = Dataset.from_dict({"prompt": [prompt_texts[i] for i in rows]})
    # GRPOTrainer loads its reference model from the policy's own path: give it the initial weights there.
    policy.save_pretrained(Path(tmp) / "policy")
    policy.config._name_or_path = str(Path(tmp) / "policy")
    trainer = GRPOTrainer(model=policy, reward_funcs=[rm], args=args, train_dataset=data,
                          processing_class=tokenizer, reward_processing_classes=[tokenizer])
    run, lengths = Run(), []
    clock = PhaseClock(run)
    trainer._generate_and_score_completions = clock.wrap("generate+reward+reference",
                                                         trainer._generate_and_score_completions)
    trainer.accelerator.backward = clock.wrap("backward", trainer.accelerator.backward)

    class CompletionLengths(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    trainer.add_callback(alternating(trainer, run, clock, opts.warmup, ours.step))
    trainer.add_callback(CompletionLengths())
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    if trainer.accelerator.distributed_type != "NO":
        raise SystemExit(f"TRL ran as {trainer.accelerator.distributed_type}, not as one plain process")
    return run, lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=8, help="measured iterations per side")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per iteration (P)")
    parser.add_argument("--group", type=int, default=4, help="samples per prompt (G)")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.01, help="KL coefficient (TRL's beta, our minmax.kl_coef)")
    opts = parser.parse_args()
    if (opts.prompts * opts.group) % opts.micro_batch:
        parser.error("--prompts x --group must be a multiple of --micro-batch")
    quiet()
    distributed_context()

    cfg = game_config(opts)
    tokenizer = build_bpe_tokenizer(tokenizer_corpus(cfg.data, cfg.tokenizer.corpus_size), cfg.tokenizer.vocab_size)
    examples = load_examples(cfg.data, "train")
    examples, _ = fit_to_context(examples, examples, cfg.data, tokenizer, "bench")
    prompts = encode_prompts(examples, cfg.data, tokenizer)
    prompt_texts = [format_prompt(ex, cfg.data, tokenizer) for ex in examples]
    schedule = list(itertools.islice(Minibatches(len(examples), opts.prompts, cfg.seed), opts.warmup + opts.iterations))

    heads = max(1, opts.hidden // 32)
    arch = ModelConfig(tiny=TinyLlamaConfig(hidden_size=opts.hidden, num_hidden_layers=opts.layers,
                                            num_attention_heads=heads, num_key_value_heads=heads,
                                            intermediate_size=4 * opts.hidden, max_position_embeddings=256))
    torch.manual_seed(cfg.seed)
    policy = load_causal_lm(arch, tokenizer, "bench.student")
    torch.manual_seed(cfg.seed + 1)
    rm = load_reward_model(arch, tokenizer, RewardPooling.last, key="bench.rm").eval().requires_grad_(False)
    twin_policy, twin_rm = copy.deepcopy(policy), copy.deepcopy(rm)

    ours = OurGame(cfg, tokenizer, policy, rm, prompts, schedule)
    ours.warmup = opts.warmup
    with tempfile.TemporaryDirectory() as tmp, plain_process():
        theirs, trl_lengths = run_grpo(opts, cfg, tokenizer, twin_policy, twin_rm, prompt_texts, ours, tmp)
    while len(ours.run.durations) < len(schedule):
        ours.step()

    w = opts.warmup
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"torch {_version('torch')}, transformers {_version('transformers')}, trl {_version('trl')}, "
          f"deepspeed {_version('deepspeed')}; device {device}, torch threads {torch.get_num_threads()}")
    print(f"policy and RM: Llama hidden {opts.hidden}, {opts.layers} layers, vocab {len(tokenizer)} "
          f"({parameter_count(policy) / 1e6:.2f}M parameters each), float32; {opts.prompts} prompts x {opts.group} "
          f"samples, <= {opts.max_new_tokens} new tokens, micro batch {opts.micro_batch}, beta {opts.beta}; "
          f"{opts.iterations} measured iterations after {w}; TRL optim={_trl_optim()}")
    print(f"mean completion length: ours {statistics.fmean(ours.lengths[w:]):.1f}, "
          f"TRL {statistics.fmean(trl_lengths[w:]) if trl_lengths else float('nan'):.1f} tokens\n")
    ours_s, trl_s = ours.run.seconds_per_step(w), theirs.seconds_per_step(w)
    rollouts = opts.prompts * opts.group
    print("| side | s/iteration | rollouts/s |")
    print("|---|---:|---:|")
    print(f"| ours (game student step) | {ours_s:.3f} | {rollouts / ours_s:.1f} |")
    print(f"| TRL GRPOTrainer | {trl_s:.3f} | {rollouts / trl_s:.1f} |")
    print(f"\nours / TRL (iterations per second): {trl_s / ours_s:.2f}\n")
    print("mean ms per measured iteration by phase:\n")
    for side, run in (("ours", ours.run), ("TRL", theirs)):
        n = run.steps(w)
        total = run.mean_seconds_per_step(w) * 1000
        cells = {k: v * 1000 / n for k, v in run.phases.items()}
        rest = total - sum(cells.values())
        print(f"- {side}: " + ", ".join(f"{k} {v:.0f}" for k, v in cells.items()) + f", rest {rest:.0f}, "
              f"total {total:.0f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
