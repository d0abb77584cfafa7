"""Supervised fine-tuning of the student on (prompt, response) pairs, loss on the response only.

With `sft.source=teacher` the responses are sampled from the teacher first, which makes this
stage vanilla black-box KD (the paper's baseline and PbKD's starting point).

With `sft.kd.loss` set it is white-box KD: on each response token the student's next-token
distribution is pulled towards the teacher's by a divergence (FKL, RKL, JSD, TVD, SKL, SRKL),
plus `ce_weight` times the cross-entropy; a fraction `on_policy_ratio` of the batches has its
responses sampled from the current student (GKD's on-policy mix).
"""

from __future__ import annotations

import logging
import random
import time
from typing import Callable

import torch

from pbkd_cli.config.schema import Divergence, KDConfig, PbkdConfig, ResponseSource
from pbkd_cli.data.gsm8k import HubUnavailable
from pbkd_cli.data.answers import read_answers
from pbkd_cli.data.minibatches import Minibatches
from pbkd_cli.data.prompts import TokenBatch, collate, encode_prompts, encode_responses, fit_to_context, gold_response
from pbkd_cli.data.tasks import load_examples
from pbkd_cli.engine import build_engine, save_model
from pbkd_cli.generation import generate
from pbkd_cli.generation.sampler import ResponseSampler
from pbkd_cli.io import PbkdError, write_jsonl
from pbkd_cli.models.factory import parameter_count
from pbkd_cli.models.lora import with_lora
from pbkd_cli.models.logits import final_hidden_states, hidden_state_head, next_token_logits
from pbkd_cli.models.roles import load_lm, load_teacher
from pbkd_cli.objectives.divergences import distillation_loss, distillation_loss_from_hidden
from pbkd_cli.objectives.language_modeling import response_nll_loss, response_nll_loss_from_hidden
from pbkd_cli.runner import Run

log = logging.getLogger("pbkd")


def teacher_responses(cfg: PbkdConfig, run: Run, examples, tokenizer, teacher=None) -> tuple[list, list[str]]:
    """The teacher's answers to the training prompts: read from `sft.teacher_answers_path`, or sampled
    (from the white-box KD teacher already loaded, if any) and saved beside the run, where later stages
    (the games, the compute-matched rows, Proxy-KD) read them back."""
    k = cfg.sft.teacher_samples_per_prompt
    if cfg.sft.teacher_answers_path is not None:
        texts = read_answers(cfg.sft.teacher_answers_path, "sft.teacher_answers_path", examples, k)
    else:
        shared = {} if teacher is None else {"model": getattr(teacher, "module", teacher), "tokenizer": tokenizer}
        texts = ResponseSampler(cfg, "teacher", **shared).sample(
            examples, k, cfg.sft.teacher_temperature,
            progress=lambda it, total: run.tracker.progress(it, total, desc="teacher samples"))
    repeated = [ex for ex in examples for _ in range(k)]
    flat = [text for group in texts for text in group]
    if run.is_main and cfg.sft.teacher_answers_path is None:
        write_jsonl(run.dir / "teacher_responses.jsonl",
                    [{"id": ex.id, "question": ex.question, "response": text} for ex, text in zip(repeated, flat)])
    return repeated, flat


def divergence_parameters(kd: KDConfig) -> dict[str, float]:
    return {Divergence.jsd: {"beta": kd.jsd_beta}, Divergence.skl: {"alpha": kd.skew_alpha},
            Divergence.srkl: {"alpha": kd.skew_alpha}}.get(kd.loss, {})


def student_responses(engine, tokenizer, prompts, cfg: PbkdConfig) -> list[list[int]]:
    """On-policy responses of the current student (GKD), one per prompt."""
    samples = generate(engine.module, tokenizer, prompts, num_samples=1, temperature=cfg.sft.kd.on_policy_temperature,
                       top_p=cfg.generation.top_p, max_new_tokens=cfg.data.max_response_tokens,
                       batch_size=cfg.generation.batch_size)
    return samples.response_ids


def load_test_split(cfg: PbkdConfig) -> list:
    """The test split of the end-of-training figure (`test_gold_nll`), read before training so that its
    absence costs no run.

    With no `data.test_path` and a hub that cannot be read (a local `data.train_path` offline), the
    figure is left out with a note instead of failing: the trained model is what the stage is for and
    the figure only a diagnostic (`pbkd eval` measures the model), so refusing to train for want of it,
    or dying after training, would serve no one. A `data.test_path` that is set but bad still fails, in
    one line, before training.
    """
    try:
        return load_examples(cfg.data, "test")
    except HubUnavailable as exc:
        log.warning("sft: no test split, so no test_gold_nll in the summary: %s", exc)
        return []


@torch.no_grad()
def mean_response_nll(model, prompts, responses, pad_id, batch_size, device) -> float:
    total, tokens = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        batch = collate(prompts[start:start + batch_size], responses[start:start + batch_size], pad_id).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss, metrics = response_nll_loss(logits, batch.input_ids, batch.response_mask)
        total += loss.item() * metrics["response_tokens"]
        tokens += metrics["response_tokens"]
    return total / max(tokens, 1)


def sft_loss(engine, batch: TokenBatch, teacher=None, kd: KDConfig | None = None,
             vocab_size: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch: the response NLL (SFT, vanilla KD) or, with a teacher, the
    divergence of its next-token distributions (over the first `vocab_size` logits) plus
    `kd.ce_weight` x NLL (white-box KD), and its metrics.

    Where a model's logits are a plain linear map of its final hidden states (`hidden_state_head`), the
    output layer runs on the response positions only: the NLL projects just those hidden states, and
    white-box KD with `kd.chunk_size` set computes both models' logits from them a chunk at a time
    (`distillation_loss_from_hidden`), so no `[tokens, vocab]` logits are ever whole. Otherwise (a
    bias, scaled or soft-capped logits, weights that ZeRO-3 partitions) the logits are computed whole,
    and the divergence chunked over them."""
    head = hidden_state_head(engine)
    if teacher is None:
        if head is None:
            logits = engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            return response_nll_loss(logits, batch.input_ids, batch.response_mask)
        decoder, weight = head
        return response_nll_loss_from_hidden(final_hidden_states(decoder, batch), weight, batch.input_ids,
                                             batch.response_mask)
    teacher_head = hidden_state_head(teacher) if kd.chunk_size else None
    if head is not None and teacher_head is not None:
        (decoder, weight), (teacher_decoder, teacher_weight) = head, teacher_head
        with torch.no_grad():
            teacher_hidden = final_hidden_states(teacher_decoder, batch)
        loss, divergence, ce = distillation_loss_from_hidden(
            kd.loss.value, final_hidden_states(decoder, batch), weight[:vocab_size], teacher_hidden,
            teacher_weight[:vocab_size], batch.input_ids[:, 1:], batch.response_mask[:, 1:], temperature=kd.temperature,
            chunk_size=kd.chunk_size, ce_weight=kd.ce_weight, **divergence_parameters(kd))
        return loss, {"ce": ce, kd.loss.value: divergence, "loss": loss.item()}
    logits = engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    loss, metrics = response_nll_loss(logits, batch.input_ids, batch.response_mask)
    with torch.no_grad():
        teacher_logits = next_token_logits(teacher, batch, vocab_size)
    divergence = distillation_loss(kd.loss.value, logits[:, :-1, :vocab_size], teacher_logits,
                                   batch.response_mask[:, 1:], temperature=kd.temperature,
                                   chunk_size=kd.chunk_size, **divergence_parameters(kd))
    metrics = {"ce": metrics["loss"], kd.loss.value: divergence.item()}
    loss = divergence + kd.ce_weight * loss if kd.ce_weight else divergence
    metrics["loss"] = loss.item()
    return loss, metrics


def sft_step(engine, batch: TokenBatch, require_finite: Callable[[float], None], teacher=None,
             kd: KDConfig | None = None, vocab_size: int | None = None) -> dict[str, float]:
    """The stage's step on one micro-batch: `sft_loss`, backward, then the engine's step (an optimiser
    step at each accumulation boundary). Returns its metrics."""
    loss, metrics = sft_loss(engine, batch, teacher, kd, vocab_size)
    require_finite(metrics["loss"])
    engine.backward(loss)
    engine.step()
    return metrics


def run(cfg: PbkdConfig, run: Run) -> dict:
    kd, trainer = cfg.sft.kd, cfg.trainer
    if not 0.0 <= kd.on_policy_ratio <= 1.0:
        raise PbkdError(f"sft.kd.on_policy_ratio={kd.on_policy_ratio}: a fraction of batches, between 0 and 1")
    if kd.loss is None and kd.on_policy_ratio > 0:
        raise PbkdError("sft.kd.on_policy_ratio: on-policy samples need a white-box loss (set sft.kd.loss)")
    role = cfg.sft.model.value
    tokenizer, policy = load_lm(cfg, role)
    examples = load_examples(cfg.data, "train")
    if not examples:
        raise PbkdError("data: the train split is empty")
    examples, overlong = fit_to_context(examples, examples, cfg.data, tokenizer, "sft train")
    test = load_test_split(cfg)
    teacher = load_teacher(cfg, tokenizer) if kd.loss is not None else None
    if cfg.sft.teacher_answers_path is not None and cfg.sft.source != ResponseSource.teacher:
        raise PbkdError("sft.teacher_answers_path: set with sft.source=gold; the teacher's answers are read "
                        "only with sft.source=teacher")
    if cfg.sft.source == ResponseSource.teacher:
        if role == "teacher":
            raise PbkdError("sft.source=teacher: the teacher cannot be distilled into itself (set sft.model=student)")
        examples, responses = teacher_responses(cfg, run, examples, tokenizer, teacher)
    else:
        responses = [gold_response(ex) for ex in examples]
    prompts = encode_prompts(examples, cfg.data, tokenizer)
    targets = encode_responses(responses, cfg.data, tokenizer)

    engine = build_engine(with_lora(policy, getattr(cfg.model, role).lora, f"model.{role}"), trainer, cfg.deepspeed)
    batches = Minibatches(len(prompts), trainer.micro_batch_size, cfg.seed)
    checkpoints, resumed, steps = run.resumable_steps("sft", trainer.max_steps, batches, policy=engine)
    window, last_loss = resumed.get("window", []), resumed.get("last_loss")
    started, tokens = time.time(), 0
    for step in steps:
        for micro in range(trainer.grad_accum):
            idx = next(batches)
            batch_prompts = [prompts[i] for i in idx]
            # GKD's coin for this micro-batch: a function of (seed, step), so a resumed run tosses the same.
            on_policy = teacher is not None and random.Random(f"{cfg.seed}/{step}/{micro}").random() < kd.on_policy_ratio
            if on_policy:
                batch_targets = student_responses(engine, tokenizer, batch_prompts, cfg)
            else:
                batch_targets = [targets[i] for i in idx]
            batch = collate(batch_prompts, batch_targets, tokenizer.pad_token_id).to(engine.device)
            metrics = sft_step(engine, batch, lambda value: checkpoints.require_finite(value, step), teacher, kd,
                               len(tokenizer))
            if teacher is not None:
                metrics["on_policy"] = float(on_policy)  # the share of the student's own samples, once averaged
            window.append(metrics)
            tokens += int(batch.attention_mask.sum())
        if step % trainer.log_every == 0 or step == trainer.max_steps:
            means = {key: sum(m[key] for m in window) / len(window) for key in window[0]}
            means = run.tracker.log({**means, "lr": engine.get_lr()[0],
                                     "tokens_per_second": tokens / (time.time() - started)}, step, prefix="sft/")
            last_loss, window = means["loss"], []
        checkpoints.step_done(step, lambda: {"step": step, "batches": batches.state_dict(),
                                             "window": window, "last_loss": last_loss})

    save_model(engine, tokenizer, run.dir / "model")
    test_nll = mean_response_nll(
        engine.module, encode_prompts(test, cfg.data, tokenizer),
        encode_responses([gold_response(ex) for ex in test], cfg.data, tokenizer),
        tokenizer.pad_token_id, cfg.generation.batch_size, engine.device) if test else None
    return {
        "model": role,
        "source": cfg.sft.source.value,
        "kd_loss": kd.loss.value if kd.loss is not None else None,
        "train_pairs": len(prompts),
        "trainable_parameters": parameter_count(engine.module, trainable_only=True),
        "overlong_prompts": overlong,
        "steps": trainer.max_steps,
        # The budget a compute-matched baseline gets: sequences the student was trained on.
        "train_sequences": trainer.max_steps * engine.train_batch_size(),
        "final_train_loss": round(last_loss, 6),
        "test_gold_nll": round(test_nll, 6) if test_nll is not None else None,
        "model_dir": str(run.dir / "model"),
    }
