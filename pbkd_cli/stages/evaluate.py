"""Exact-match accuracy of one model on a split: greedy, plus sampled and majority vote when n > 1."""

from __future__ import annotations

from collections import Counter

from pbkd_cli.config.schema import PbkdConfig
from pbkd_cli.data.gsm8k import extract_answer
from pbkd_cli.data.prompts import encode_prompts, fit_to_context
from pbkd_cli.data.tasks import load_examples
from pbkd_cli.engine import gather, inference_device, shard
from pbkd_cli.generation import generate
from pbkd_cli.io import PbkdError, write_jsonl
from pbkd_cli.runner import Run
from pbkd_cli.stages._shared import load_lm


def majority(answers: list[str | None]) -> str | None:
    votes = Counter(a for a in answers if a is not None)
    return votes.most_common(1)[0][0] if votes else None


def run(cfg: PbkdConfig, run: Run) -> dict:
    role = cfg.eval.model.value
    tokenizer, model = load_lm(cfg, role)
    model.to(inference_device())
    examples = load_examples(cfg.data, cfg.eval.split)[: cfg.eval.limit]
    if not examples:
        raise PbkdError(f"eval.split={cfg.eval.split}: no examples to evaluate")
    examples, overlong = fit_to_context(examples, examples, cfg.data, tokenizer, f"eval {cfg.eval.split}")
    prompts = encode_prompts(examples, cfg.data, tokenizer)

    def sample(num_samples: int, temperature: float, desc: str) -> list[list[str]]:
        """`num_samples` texts per example; each rank samples its share of the examples."""
        samples = generate(model, tokenizer, shard(prompts), num_samples=num_samples, temperature=temperature,
                           max_new_tokens=cfg.data.max_response_tokens, top_p=cfg.generation.top_p,
                           batch_size=cfg.generation.batch_size,
                           progress=lambda it, total: run.tracker.progress(it, total, desc=desc))
        texts = samples.texts
        local = [(texts[i * num_samples:(i + 1) * num_samples], samples.finished[i * num_samples],
                  len(samples.response_ids[i * num_samples])) for i in range(len(texts) // num_samples)]
        return gather(local, len(prompts))

    greedy = sample(1, 0.0, f"eval {role}")
    rows = []
    for ex, (texts, _, _) in zip(examples, greedy):
        text = texts[0]
        prediction = extract_answer(text)
        rows.append({"id": ex.id, "question": ex.question, "answer": ex.answer, "response": text,
                     "prediction": prediction, "correct": prediction == ex.answer})
    summary = {
        "model": role,
        "name_or_path": getattr(cfg.model, role).name_or_path,
        "split": cfg.eval.split,
        "n": len(rows),
        "overlong_prompts": overlong,
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
        "finished_fraction": sum(finished for _, finished, _ in greedy) / len(rows),
        "mean_response_tokens": sum(tokens for _, _, tokens in greedy) / len(rows),
    }
    k = cfg.eval.num_samples
    if k > 1:
        sampled = sample(k, cfg.eval.temperature, f"eval {role} n={k}")
        for row, (texts, _, _) in zip(rows, sampled):
            answers = [extract_answer(t) for t in texts]
            row["samples"] = texts
            row["sampled_correct"] = sum(a == row["answer"] for a in answers)
            row["majority_correct"] = majority(answers) == row["answer"]
        summary["sampled_accuracy"] = sum(r["sampled_correct"] for r in rows) / (k * len(rows))
        summary[f"maj@{k}"] = sum(r["majority_correct"] for r in rows) / len(rows)
    if run.is_main:
        write_jsonl(run.dir / "predictions.jsonl", rows)
    run.tracker.log({k: v for k, v in summary.items() if isinstance(v, float)}, step=0, prefix="eval/", reduce=False)
    return summary
