"""Exact-match accuracy of one model on a split: greedy, plus sampled and majority vote when n > 1."""

from __future__ import annotations

from collections import Counter

from pbkd_cli.config.schema import PbkdConfig
from pbkd_cli.data.gsm8k import extract_answer
from pbkd_cli.data.prompts import encode_prompts
from pbkd_cli.data.tasks import load_examples
from pbkd_cli.engine import inference_device
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
    prompts = encode_prompts(examples, cfg.data, tokenizer)

    def sample(num_samples: int, temperature: float, desc: str):
        return generate(model, tokenizer, prompts, num_samples=num_samples, temperature=temperature,
                        max_new_tokens=cfg.data.max_response_tokens, top_p=cfg.generation.top_p,
                        batch_size=cfg.generation.batch_size,
                        progress=lambda it, total: run.tracker.progress(it, total, desc=desc))

    greedy = sample(1, 0.0, f"eval {role}")
    rows = []
    for ex, text in zip(examples, greedy.texts):
        prediction = extract_answer(text)
        rows.append({"id": ex.id, "question": ex.question, "answer": ex.answer, "response": text,
                     "prediction": prediction, "correct": prediction == ex.answer})
    summary = {
        "model": role,
        "name_or_path": getattr(cfg.model, role).name_or_path,
        "split": cfg.eval.split,
        "n": len(rows),
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
        "finished_fraction": sum(greedy.finished) / len(rows),
        "mean_response_tokens": greedy.generated_tokens / len(rows),
    }
    k = cfg.eval.num_samples
    if k > 1:
        sampled = sample(k, cfg.eval.temperature, f"eval {role} n={k}")
        for i, row in enumerate(rows):
            answers = [extract_answer(t) for t in sampled.texts[i * k:(i + 1) * k]]
            row["samples"] = sampled.texts[i * k:(i + 1) * k]
            row["sampled_correct"] = sum(a == row["answer"] for a in answers)
            row["majority_correct"] = majority(answers) == row["answer"]
        summary["sampled_accuracy"] = sum(r["sampled_correct"] for r in rows) / (k * len(rows))
        summary[f"maj@{k}"] = sum(r["majority_correct"] for r in rows) / len(rows)
    write_jsonl(run.dir / "predictions.jsonl", rows)
    run.tracker.log({k: v for k, v in summary.items() if isinstance(v, float)}, step=0, prefix="eval/")
    return summary
