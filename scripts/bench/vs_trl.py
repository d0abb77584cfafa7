#!/usr/bin/env python
"""Training-step throughput of pbkd's loops against TRL's trainers, side by side in one process.

Three pairs; in each, both sides start from the same tiny Llama (same initial weights, built from a
config with the vocabulary of a BPE tokenizer fitted on the arithmetic task), see the same batches in
the same order (micro batch --micro-batch, the same token sequences, checked) and take the same
number of optimizer steps with the same optimiser settings (AdamW, lr, betas, weight decay, clipping,
warm-up + cosine schedule), in float32, without gradient checkpointing, packing, logging or eval:

  sft  pbkd's SFT step (`pbkd_cli/stages/sft.py`'s `sft_step` on a DeepSpeed engine from
       `build_engine`, batches from `collate`) vs TRL's `SFTTrainer` on prompt/completion text
       (completion-only loss);
  rm   pbkd's reward-model step (`train_rm.py`'s `rm_step`: value head from `load_reward_model`,
       `score`) vs TRL's `RewardTrainer` on prompt/chosen/rejected text;
  kd   pbkd's white-box KD step (`sft_step` with `sft.kd.loss=jsd|fkl` against a frozen teacher,
       teacher of the student's architecture) vs TRL's `GKDTrainer` with lmbda=0 (no on-policy
       generation) and beta=jsd_beta for jsd, beta=0 for fkl (TRL's forward-KL end point).

A step is everything between two optimizer updates: fetching and collating the batch, forward,
loss, backward, clipping, optimizer and schedule. The two sides alternate step by step (one step of
ours runs from TRL's step-end callback, outside TRL's clock), so that both see the same load from
whatever else the machine runs. s/step is the median over the steps after the --warmup first ones
(other processes on a shared machine only ever add time); tokens/s is the mean number of non-pad
tokens of those steps (attention mask; for the RM both rows of every pair) over that median. A
second table splits the mean step into phases.

Not symmetric: ours runs as pbkd does, inside a DeepSpeed engine (`deepspeed=zero0`, world size 1,
gloo on the CPU) wrapping a torch AdamW; TRL runs with its own default, the HF Trainer through
accelerate as one plain process (the launcher variables pbkd sets for DeepSpeed are hidden from it,
or accelerate would wrap the model in DDP), no DeepSpeed, and the HF default optimiser (printed).

On a shared CPU machine run one benchmark at a time with OMP_NUM_THREADS=1: with 2 threads on 2
busy cores, single steps swing 3-5x whenever another process takes a core.

    OMP_NUM_THREADS=1 python scripts/bench/vs_trl.py [--steps 15] [--warmup 3] [--micro-batch 32]
                                                     [--hidden 128] [--layers 4] [--only sft|rm|kd]
                                                     [--kd-loss jsd|fkl] [--rm-pooling last|mean]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import logging
import math
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import torch

from pbkd_cli.config.compose import compose, to_typed
from pbkd_cli.config.schema import Divergence, ModelConfig, RewardPooling, TinyLlamaConfig
from pbkd_cli.data.gsm8k import ANSWER_MARKER
from pbkd_cli.data.prompts import (collate, encode_prompts, encode_responses, fit_to_context, format_prompt,
                                   gold_response, pair_batch)
from pbkd_cli.data.tasks import load_examples, tokenizer_corpus
from pbkd_cli.engine import build_engine, build_frozen_engine, distributed_context
from pbkd_cli.models import build_bpe_tokenizer, load_causal_lm
from pbkd_cli.models.factory import parameter_count
from pbkd_cli.models.reward import load_reward_model, score
from pbkd_cli.data.minibatches import Minibatches
from pbkd_cli.stages.sft import sft_step
from pbkd_cli.stages.train_rm import rm_step

PAIRS = {"sft": "SFTTrainer", "rm": "RewardTrainer", "kd": "GKDTrainer"}


# --------------------------------------------------------------------------------------------- timing


@dataclass
class Run:
    """What one side of a pair did: the wall time and the non-pad tokens of each optimizer step, and
    seconds per phase summed over the measured steps."""

    durations: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    skipped: str | None = None

    def steps(self, warmup: int) -> int:
        return len(self.durations) - warmup

    def seconds_per_step(self, warmup: int) -> float:
        """Median over the measured steps: other processes on a shared machine only ever add time."""
        return statistics.median(self.durations[warmup:])

    def mean_seconds_per_step(self, warmup: int) -> float:
        return statistics.fmean(self.durations[warmup:])

    def tokens_per_second(self, warmup: int) -> float:
        return statistics.fmean(self.tokens[warmup:len(self.durations)]) / self.seconds_per_step(warmup)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PhaseClock:
    """Wall time per named phase, counted once `active` (after the warm-up steps). Phases may nest
    (TRL's teacher forward runs inside its compute_loss): each is charged its own time only."""

    def __init__(self, run: Run):
        self.run, self.active = run, False
        self._inner: list[float] = []  # time spent in nested phases, one entry per open phase

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            _sync()
            spent = time.perf_counter() - start
            inner = self._inner.pop()
            if self._inner:
                self._inner[-1] += spent
            if self.active:
                self.run.phases[name] = self.run.phases.get(name, 0.0) + spent - inner

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with self(name):
                return fn(*args, **kwargs)
        return timed


# ------------------------------------------------------------------------------------------ set-up


@dataclass
class Bench:
    opts: argparse.Namespace
    cfg: object
    tokenizer: object
    batches: list[list[int]]  # example indices of each optimizer step, in order
    prompt_texts: list[str]
    chosen_texts: list[str]
    rejected_texts: list[str]
    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]

    @property
    def total_steps(self) -> int:
        return self.opts.warmup + self.opts.steps

    @property
    def rows(self) -> list[int]:
        return [i for idx in self.batches for i in idx]

    @property
    def max_length(self) -> int:
        return self.cfg.data.max_prompt_tokens + self.cfg.data.max_response_tokens

    def arch(self) -> ModelConfig:
        hidden = self.opts.hidden
        heads = max(1, hidden // 32)
        return ModelConfig(tiny=TinyLlamaConfig(hidden_size=hidden, num_hidden_layers=self.opts.layers,
                                                num_attention_heads=heads, num_key_value_heads=heads,
                                                intermediate_size=4 * hidden, max_position_embeddings=256))


def wrong_answer(solution: str, answer: str) -> str:
    """The rejected response of a pair: the gold working with a final answer off by one."""
    head = solution.rsplit(ANSWER_MARKER, 1)[0]
    return " " + f"{head}{ANSWER_MARKER} {int(answer) + 1}".strip()


def setup(opts: argparse.Namespace) -> Bench:
    cfg = to_typed(compose(["stage=sft", "+exp=demo"]))
    cfg.trainer = dataclasses.replace(cfg.trainer, micro_batch_size=opts.micro_batch, grad_accum=1,
                                      max_steps=opts.warmup + opts.steps, log_every=10**9)
    tokenizer = build_bpe_tokenizer(tokenizer_corpus(cfg.data, cfg.tokenizer.corpus_size), cfg.tokenizer.vocab_size)
    examples = load_examples(cfg.data, "train")
    examples, _ = fit_to_context(examples, examples, cfg.data, tokenizer, "bench")
    order = Minibatches(len(examples), opts.micro_batch, cfg.seed)
    batches = [next(order) for _ in range(opts.warmup + opts.steps)]
    chosen_texts = [gold_response(ex) for ex in examples]
    rejected_texts = [wrong_answer(ex.solution, ex.answer) for ex in examples]
    return Bench(opts=opts, cfg=cfg, tokenizer=tokenizer, batches=batches,
                 prompt_texts=[format_prompt(ex, cfg.data, tokenizer) for ex in examples],
                 chosen_texts=chosen_texts, rejected_texts=rejected_texts,
                 prompts=encode_prompts(examples, cfg.data, tokenizer),
                 chosen=encode_responses(chosen_texts, cfg.data, tokenizer),
                 rejected=encode_responses(rejected_texts, cfg.data, tokenizer))


# ------------------------------------------------------------------------------------------- ours


class Ours:
    """pbkd's loop body, one optimizer step (one micro-batch, grad_accum=1) per `step()` call, so that
    its steps can alternate with TRL's. `body(idx, clock)` collates the batch and calls the stage's own
    step function; the engine's backward and step (and a teacher's forward) are timed as phases of it."""

    def __init__(self, bench: Bench, engine, body, teacher=None):
        self.bench, self.body = bench, body
        self.run = Run()
        self.clock = PhaseClock(self.run)
        engine.backward = self.clock.wrap("backward", engine.backward)
        engine.step = self.clock.wrap("optimizer step", engine.step)
        if teacher is not None:
            module = getattr(teacher, "module", teacher)
            module.forward = self.clock.wrap("teacher forward", module.forward)

    def step(self) -> None:
        done = len(self.run.durations)
        self.clock.active = done >= self.bench.opts.warmup
        _sync()
        start = time.perf_counter()
        self.run.tokens.append(self.body(self.bench.batches[done], self.clock))
        _sync()
        self.run.durations.append(time.perf_counter() - start)

    def finish(self) -> Run:
        """The steps not taken yet (all of them when there is no TRL side to alternate with)."""
        while len(self.run.durations) < len(self.bench.batches):
            self.step()
        return self.run


def _finite(value: float) -> None:
    # As `checkpoints.require_finite` in the stage loops.
    if not math.isfinite(value):
        raise RuntimeError(f"non-finite loss {value}")


def ours_sft(bench: Bench, model) -> Ours:
    engine = build_engine(model, bench.cfg.trainer, bench.cfg.deepspeed)
    pad = bench.tokenizer.pad_token_id

    def body(idx, clock):
        with clock("collate"):
            batch = collate([bench.prompts[i] for i in idx], [bench.chosen[i] for i in idx], pad).to(engine.device)
        with clock("forward+loss"):
            sft_step(engine, batch, _finite)
        return int(batch.attention_mask.sum())

    return Ours(bench, engine, body)


def ours_rm(bench: Bench, model) -> Ours:
    engine = build_engine(model, bench.cfg.trainer, bench.cfg.deepspeed)
    pad = bench.tokenizer.pad_token_id

    def body(idx, clock):
        with clock("collate"):
            batch = pair_batch(bench.prompts, bench.chosen, bench.rejected, idx, pad).to(engine.device)
        with clock("forward+loss"):
            rm_step(engine, batch, score, _finite)
        return int(batch.attention_mask.sum())

    return Ours(bench, engine, body)


def ours_kd(bench: Bench, model, teacher) -> Ours:
    kd = dataclasses.replace(bench.cfg.sft.kd, loss=Divergence(bench.opts.kd_loss))
    teacher = build_frozen_engine(teacher, bench.cfg.deepspeed)
    engine = build_engine(model, bench.cfg.trainer, bench.cfg.deepspeed)
    pad, vocab = bench.tokenizer.pad_token_id, len(bench.tokenizer)

    def body(idx, clock):
        with clock("collate"):
            batch = collate([bench.prompts[i] for i in idx], [bench.chosen[i] for i in idx], pad).to(engine.device)
        with clock("forward+loss"):
            sft_step(engine, batch, _finite, teacher, kd, vocab)
        return int(batch.attention_mask.sum())

    return Ours(bench, engine, body, teacher)


# -------------------------------------------------------------------------------------------- TRL


def trl_args(bench: Bench, config_cls, output_dir: str, **extra):
    trainer = bench.cfg.trainer
    return config_cls(
        output_dir=output_dir, max_steps=trainer.max_steps, per_device_train_batch_size=trainer.micro_batch_size,
        gradient_accumulation_steps=1, learning_rate=trainer.lr, weight_decay=trainer.weight_decay,
        adam_beta1=trainer.adam_betas[0], adam_beta2=trainer.adam_betas[1], max_grad_norm=trainer.max_grad_norm,
        lr_scheduler_type=trainer.lr_schedule.value,
        warmup_steps=int(trainer.warmup_ratio * trainer.max_steps),  # as build_engine computes it
        max_length=bench.max_length, train_sampling_strategy="sequential",  # our batches, in our order
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, bf16=False, fp16=False, gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(), seed=bench.cfg.seed, **extra)


class _CountingCollator:
    """The trainer's own collator, recording the non-pad tokens of each batch it builds."""

    def __init__(self, inner):
        self.inner, self.tokens = inner, []

    def __call__(self, features):
        out = self.inner(features)
        self.tokens.append(int(out["attention_mask"].sum()))
        return out


def alternating(trainer, run: Run, clock: PhaseClock, warmup: int, our_step):
    """A TrainerCallback that records the wall time of each of the trainer's steps into `run` and then
    takes one step of ours (`our_step()`, outside the trainer's clock): both sides then see the same
    load from whatever else the machine runs."""
    from transformers import TrainerCallback

    resumed = [0.0]

    class Alternate(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            # The optimizer exists now: time its step (clipping stays in "rest").
            trainer.optimizer.step = clock.wrap("optimizer step", trainer.optimizer.step)
            _sync()
            resumed[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            run.durations.append(time.perf_counter() - resumed[0])
            clock.active = state.global_step >= warmup
            our_step()
            resumed[0] = time.perf_counter()

    return Alternate()


def run_trl(bench: Bench, trainer, ours: Ours) -> Run:
    """Train with TRL, taking one step of ours after each of TRL's steps (`alternating`)."""
    run = Run()
    clock = PhaseClock(run)
    counter = _CountingCollator(clock.wrap("collate", trainer.data_collator))
    trainer.data_collator = counter
    trainer.compute_loss = clock.wrap("forward+loss", trainer.compute_loss)
    trainer.accelerator.backward = clock.wrap("backward", trainer.accelerator.backward)
    teacher = getattr(trainer, "teacher_model", None)
    if teacher is not None:
        teacher.forward = clock.wrap("teacher forward", teacher.forward)
    trainer.add_callback(alternating(trainer, run, clock, bench.opts.warmup, ours.step))
    with contextlib.redirect_stdout(io.StringIO()):  # the HF Trainer prints its final metrics
        trainer.train()
    if trainer.accelerator.distributed_type != "NO":
        raise SystemExit(f"TRL ran as {trainer.accelerator.distributed_type}, not as one plain process")
    # The dataloader builds one batch ahead; keep those of the steps taken.
    run.tokens = counter.tokens[:len(run.durations)]
    return run


def trl_sft(bench: Bench, model, ours: Ours, tmp: str) -> Run:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = bench.rows
    data = Dataset.from_dict({"prompt": [bench.prompt_texts[i] for i in rows],
                              "completion": [bench.chosen_texts[i] for i in rows]})
    args = trl_args(bench, SFTConfig, tmp, packing=False, completion_only_loss=True, dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=bench.tokenizer)
    prepared = trainer.train_dataset
    expected = [bench.prompts[i] + bench.chosen[i] for i in rows]
    _check_same(prepared["input_ids"], expected, "SFTTrainer input_ids")
    _check_same([[t != -100 for t in row] for row in prepared["labels"]],
                [[False] * len(bench.prompts[i]) + [True] * len(bench.chosen[i]) for i in rows],
                "SFTTrainer completion mask")
    return run_trl(bench, trainer, ours)


def trl_rm(bench: Bench, model, ours: Ours, tmp: str) -> Run:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    rows = bench.rows
    data = Dataset.from_dict({"prompt": [bench.prompt_texts[i] for i in rows],
                              "chosen": [bench.chosen_texts[i] for i in rows],
                              "rejected": [bench.rejected_texts[i] for i in rows]})
    args = trl_args(bench, RewardConfig, tmp, dataset_num_proc=None)
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=bench.tokenizer)
    prepared = trainer.train_dataset
    _check_same(prepared["chosen_ids"], [bench.prompts[i] + bench.chosen[i] for i in rows], "RewardTrainer chosen")
    _check_same(prepared["rejected_ids"], [bench.prompts[i] + bench.rejected[i] for i in rows],
                "RewardTrainer rejected")
    return run_trl(bench, trainer, ours)


def gkd_classes():
    """GKDTrainer moved to `trl.experimental.gkd` in TRL 0.2x; older releases export it at the top."""
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        from trl import GKDConfig, GKDTrainer
    return GKDConfig, GKDTrainer


def trl_kd(bench: Bench, model, teacher, ours: Ours, tmp: str) -> Run:
    from datasets import Dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    GKDConfig, GKDTrainer = gkd_classes()
    rows = bench.rows
    # GKDTrainer skips SFT's dataset preparation and its default collator needs chat messages (our
    # tokenizer has no chat template), so it gets the very token ids SFTTrainer builds from the same
    # prompt/completion text (checked in the sft pair) and SFTTrainer's own collator.
    data = Dataset.from_dict({"input_ids": [bench.prompts[i] + bench.chosen[i] for i in rows],
                              "labels": [[-100] * len(bench.prompts[i]) + bench.chosen[i] for i in rows]})
    beta = 0.0 if bench.opts.kd_loss == "fkl" else bench.cfg.sft.kd.jsd_beta
    args = trl_args(bench, GKDConfig, tmp, lmbda=0.0, beta=beta, seq_kd=False, packing=False)
    trainer = GKDTrainer(model=model, teacher_model=teacher, args=args, train_dataset=data,
                         processing_class=bench.tokenizer,
                         data_collator=DataCollatorForLanguageModeling(pad_token_id=bench.tokenizer.pad_token_id))
    return run_trl(bench, trainer, ours)


def _check_same(got, expected, what: str) -> None:
    bad = sum(list(a) != list(b) for a, b in zip(got, expected)) + abs(len(got) - len(expected))
    if bad:
        raise SystemExit(f"{what}: {bad} of {len(expected)} rows differ from ours; the sequences would not be "
                         "the same")


# ------------------------------------------------------------------------------------------- main


def trl_missing(pair: str) -> str | None:
    try:
        if pair == "kd":
            gkd_classes()
        else:
            import trl
            getattr(trl, PAIRS[pair])
    except (ImportError, AttributeError) as exc:
        return f"{PAIRS[pair]} not found in the installed trl ({exc.__class__.__name__}: {exc})"
    return None


@contextlib.contextmanager
def plain_process():
    """TRL as a plain `python train.py` runs it: without the launcher variables that
    `distributed_context()` set for DeepSpeed. With LOCAL_RANK set, accelerate would take this one
    process for a distributed job (MULTI_CPU, or MULTI_GPU on CUDA) and wrap the model in DDP
    (find_unused_parameters=True) on the process group DeepSpeed opened: not TRL's default."""
    saved = {key: os.environ.pop(key) for key in LAUNCHER_VARIABLES if key in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def run_pair(bench: Bench, pair: str) -> tuple[Run, Run]:
    arch = bench.arch()
    torch.manual_seed(bench.cfg.seed)
    if pair == "rm":
        pooling = RewardPooling(bench.opts.rm_pooling)
        model = load_reward_model(arch, bench.tokenizer, pooling, key="bench.rm")
    else:
        model = load_causal_lm(arch, bench.tokenizer, "bench.student")
    teacher = None
    if pair == "kd":
        torch.manual_seed(bench.cfg.seed + 1)
        teacher = load_causal_lm(arch, bench.tokenizer, "bench.teacher")
    twin, twin_teacher = copy.deepcopy(model), copy.deepcopy(teacher)  # the same initial weights for TRL

    if pair == "sft":
        ours = ours_sft(bench, model)
    elif pair == "rm":
        ours = ours_rm(bench, model)
    else:
        ours = ours_kd(bench, model, teacher)
    missing = trl_missing(pair)
    if missing:
        return ours.finish(), Run(skipped=missing)
    with tempfile.TemporaryDirectory() as tmp, plain_process():
        if pair == "sft":
            theirs = trl_sft(bench, twin, ours, tmp)
        elif pair == "rm":
            theirs = trl_rm(bench, twin, ours, tmp)
        else:
            theirs = trl_kd(bench, twin, twin_teacher, ours, tmp)
    ours = ours.finish()
    if len(theirs.durations) != len(ours.durations):
        raise SystemExit(f"{pair}: TRL took {len(theirs.durations)} steps, ours {len(ours.durations)}")
    if theirs.tokens != ours.tokens:
        raise SystemExit(f"{pair}: TRL's batches hold {theirs.tokens[:5]}... non-pad tokens, ours "
                         f"{ours.tokens[:5]}...; the batches differ")
    return ours, theirs


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for name in ("transformers", "trl", "accelerate", "DeepSpeed", "datasets", "pbkd"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15, help="measured optimizer steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the figures")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--only", choices=sorted(PAIRS), help="run one pair only")
    parser.add_argument("--kd-loss", choices=["jsd", "fkl"], default="jsd",
                        help="our divergence; TRL's GKD gets beta=jsd_beta (jsd) or 0 (fkl)")
    parser.add_argument("--rm-pooling", choices=[p.value for p in RewardPooling], default="last",
                        help="our RM's pooling: last (pbkd's default, as TRL's classifier reads) or mean (opt-in)")
    opts = parser.parse_args()
    if opts.steps < 1 or opts.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    quiet()
    distributed_context()  # RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for DeepSpeed

    bench = setup(opts)
    pairs = [opts.only] if opts.only else list(PAIRS)
    results = {}
    for pair in pairs:
        results[pair] = run_pair(bench, pair)
        quiet()  # the trainers reset some loggers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    kd_label = f"jsd, beta {bench.cfg.sft.kd.jsd_beta}" if opts.kd_loss == "jsd" else "fkl, beta 0"
    names = {"sft": "SFT", "rm": f"RM (Bradley-Terry, {opts.rm_pooling} pooling)", "kd": f"white-box KD ({kd_label})"}
    sample = bench.arch()
    w = opts.warmup
    print(f"torch {_version('torch')}, transformers {_version('transformers')}, trl {_version('trl')}, "
          f"deepspeed {_version('deepspeed')}, accelerate {_version('accelerate')}; device {device}, "
          f"torch threads {torch.get_num_threads()}")
    params = parameter_count(load_causal_lm(sample, bench.tokenizer, "bench.student"))
    print(f"model: Llama hidden {opts.hidden}, {opts.layers} layers, {sample.tiny.num_attention_heads} heads, "
          f"vocab {len(bench.tokenizer)} ({params / 1e6:.2f}M parameters), float32; micro batch {opts.micro_batch}, "
          f"{opts.steps} measured steps after {w} warm-up steps, the same batches on both sides")
    print("s/step: median of the measured steps; tokens/s: mean non-pad tokens per measured step / that median")
    print("not symmetric: ours runs in a DeepSpeed engine (ZeRO stage 0, world size 1) with torch AdamW; TRL runs "
          "in the HF Trainer + accelerate as one plain process (no DeepSpeed, no DDP), optim=" + _trl_optim())
    print("the two sides alternate step by step, so both see the same machine load\n")
    print("| step | TRL trainer | ours tokens/s | TRL tokens/s | ours s/step | TRL s/step | ours/TRL tokens/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for pair, (ours, theirs) in results.items():
        if theirs.skipped:
            print(f"| {names[pair]} | skipped: {theirs.skipped} | {ours.tokens_per_second(w):,.0f} | - "
                  f"| {ours.seconds_per_step(w):.4f} | - | - |")
            continue
        print(f"| {names[pair]} | {PAIRS[pair]} | {ours.tokens_per_second(w):,.0f} "
              f"| {theirs.tokens_per_second(w):,.0f} | {ours.seconds_per_step(w):.4f} "
              f"| {theirs.seconds_per_step(w):.4f} "
              f"| {ours.tokens_per_second(w) / theirs.tokens_per_second(w):.2f} |")
    print("\nnon-pad tokens per measured step (mean, both sides): "
          + ", ".join(f"{pair} {statistics.fmean(r[0].tokens[w:]):.0f}" for pair, r in results.items()))
    print("\nmean ms per measured step by phase (ours' optimizer step is DeepSpeed's `engine.step`: clipping, "
          "AdamW, schedule; TRL's is the AdamW step alone, its clipping and schedule fall in 'rest', with data "
          "loading and trainer bookkeeping):\n")
    print("| step | side | " + " | ".join(PHASES) + " | rest | total |")
    print("|---|---|" + "---:|" * (len(PHASES) + 2))
    for pair, (ours, theirs) in results.items():
        for side, run in (("ours", ours), ("TRL", theirs)):
            if run.skipped:
                continue
            n = run.steps(w)
            total = run.mean_seconds_per_step(w) * 1000
            cells = [run.phases.get(p, 0.0) * 1000 / n for p in PHASES]
            print(f"| {pair} | {side} | " + " | ".join(f"{c:.1f}" for c in cells)
                  + f" | {total - sum(cells):.1f} | {total:.1f} |")


PHASES = ("collate", "forward+loss", "teacher forward", "backward", "optimizer step")


def _trl_optim() -> str:
    try:
        from transformers import TrainingArguments

        return str(TrainingArguments.__dataclass_fields__["optim"].default)
    except Exception:  # noqa: BLE001 (only a label)
        return "?"


if __name__ == "__main__":
    main()
