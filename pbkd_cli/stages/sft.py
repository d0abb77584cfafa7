"""Supervised fine-tuning of the student on (prompt, response) pairs, loss on the response only.

With `sft.source=teacher` the responses are sampled from the teacher first, which makes this
stage vanilla black-box KD (the paper's baseline and PbKD's starting point).
"""

from __future__ import annotations

import time

import torch

from pbkd_cli.config.schema import PbkdConfig, ResponseSource
from pbkd_cli.data.prompts import collate, encode_prompts, encode_responses, gold_response
from pbkd_cli.data.tasks import load_examples
from pbkd_cli.engine import build_engine, save_model
from pbkd_cli.io import PbkdError, write_jsonl
from pbkd_cli.objectives.language_modeling import response_nll_loss
from pbkd_cli.runner import Run
from pbkd_cli.stages._shared import ResponseSampler, load_lm, minibatches


def teacher_responses(cfg: PbkdConfig, run: Run, examples) -> tuple[list, list[str]]:
    """Sample the teacher's answers to the training prompts (saved beside the run for inspection)."""
    k = cfg.sft.teacher_samples_per_prompt
    texts = ResponseSampler(cfg, "teacher").sample(
        examples, k, cfg.sft.teacher_temperature,
        progress=lambda it, total: run.tracker.progress(it, total, desc="teacher samples"))
    repeated = [ex for ex in examples for _ in range(k)]
    flat = [text for group in texts for text in group]
    write_jsonl(run.dir / "teacher_responses.jsonl",
                [{"id": ex.id, "question": ex.question, "response": text} for ex, text in zip(repeated, flat)])
    return repeated, flat


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


def run(cfg: PbkdConfig, run: Run) -> dict:
    role = cfg.sft.model.value
    tokenizer, policy = load_lm(cfg, role)
    examples = load_examples(cfg.data, "train")
    if not examples:
        raise PbkdError("data: the train split is empty")
    if cfg.sft.source == ResponseSource.teacher:
        if role == "teacher":
            raise PbkdError("sft.source=teacher: the teacher cannot be distilled into itself (set sft.model=student)")
        examples, responses = teacher_responses(cfg, run, examples)
    else:
        responses = [gold_response(ex) for ex in examples]
    prompts = encode_prompts(examples, cfg.data, tokenizer)
    targets = encode_responses(responses, cfg.data, tokenizer)

    trainer = cfg.trainer
    engine = build_engine(policy, trainer, cfg.deepspeed)
    batches = minibatches(len(prompts), trainer.micro_batch_size, cfg.seed)
    window, started, tokens = [], time.time(), 0
    for step in run.tracker.progress(range(1, trainer.max_steps + 1), total=trainer.max_steps, desc="sft"):
        for _ in range(trainer.grad_accum):
            idx = next(batches)
            batch = collate([prompts[i] for i in idx], [targets[i] for i in idx], tokenizer.pad_token_id)
            batch = batch.to(engine.device)
            logits = engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss, metrics = response_nll_loss(logits, batch.input_ids, batch.response_mask)
            engine.backward(loss)
            engine.step()
            window.append(metrics["loss"])
            tokens += int(batch.attention_mask.sum())
        if step % trainer.log_every == 0 or step == trainer.max_steps:
            run.tracker.log({"loss": sum(window) / len(window), "lr": engine.get_lr()[0],
                             "tokens_per_second": tokens / (time.time() - started)}, step, prefix="sft/")
            last_loss, window = sum(window) / len(window), []

    save_model(engine, tokenizer, run.dir / "model")
    test = load_examples(cfg.data, "test")
    test_nll = mean_response_nll(
        engine.module, encode_prompts(test, cfg.data, tokenizer),
        encode_responses([gold_response(ex) for ex in test], cfg.data, tokenizer),
        tokenizer.pad_token_id, cfg.generation.batch_size, engine.device) if test else None
    return {
        "model": role,
        "source": cfg.sft.source.value,
        "train_pairs": len(prompts),
        "steps": trainer.max_steps,
        "final_train_loss": round(last_loss, 6),
        "test_gold_nll": round(test_nll, 6) if test_nll is not None else None,
        "model_dir": str(run.dir / "model"),
    }
