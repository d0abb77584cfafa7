"""Evaluate one or several checkpoints on the configured benchmarks, and write one comparison table.

Benchmarks (`eval.benchmarks`, from `conf/benchmarks/`):
  - the run's task and GSM8K-format problems: exact match of the final number of a greedy answer
    (with `eval.num_samples` > 1 also sampled accuracy, majority vote, pass@k and the headroom for
    reward-guided training: problems greedy gets wrong and a sample gets right);
  - multiple choice (ARC / MMLU style): the choice the model gives the highest log-likelihood;
  - instruction following (Dolly / Self-Instruct / Vicuna style): ROUGE-L of a greedy answer.
Each rank scores its share of the items; rank 0 writes predictions, in the single-process order.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import torch

from pbkd_cli.config.schema import BenchmarkConfig, BenchmarkKind, PbkdConfig, TaskName
from pbkd_cli.data.benchmarks import instruction_prompt, load_benchmark
from pbkd_cli.data.gsm8k import extract_answer
from pbkd_cli.data.prompts import collate, encode_prompts, fit_to_context, gold_response
from pbkd_cli.data.tasks import load_examples
from pbkd_cli.engine import gather, inference_device, shard
from pbkd_cli.generation.sampler import load_sampling_model
from pbkd_cli.io import PbkdError, atomic_write_text, path_component, write_jsonl
from pbkd_cli.models.roles import load_lm
from pbkd_cli.objectives.policy_gradient import sequence_logprobs
from pbkd_cli.objectives.scoring import multiple_choice_figures, rouge_l, sampled_figures
from pbkd_cli.runner import Run

# The figures of each kind that go into the comparison table.
HEADLINE = {BenchmarkKind.task: ("accuracy",), BenchmarkKind.gsm8k: ("accuracy",),
            BenchmarkKind.multiple_choice: ("accuracy", "accuracy_norm"), BenchmarkKind.instruction: ("rouge_l",)}


def majority(answers: list[str | None]) -> str | None:
    votes = Counter(a for a in answers if a is not None)
    return votes.most_common(1)[0][0] if votes else None


class Scorer:
    """One model on the benchmarks; each method returns (figures, prediction rows)."""

    def __init__(self, cfg: PbkdConfig, run: Run, role: str):
        self.cfg, self.run = cfg, run
        # Greedy answers may come from vLLM; log-likelihoods always from the Hugging Face model.
        self.tokenizer, self.model, self.generate = load_sampling_model(cfg, role)
        if self.model is None:
            self.model = load_lm(cfg, role)[1].to(inference_device())
        self.model.eval()

    def sample(self, prompts: list[list[int]], num_samples: int, temperature: float, desc: str) -> list[dict]:
        """Per prompt: its `num_samples` texts, and whether the first ended with eos and its length.
        Each rank samples its share."""
        samples = self.generate(shard(prompts), num_samples=num_samples, temperature=temperature,
                                max_new_tokens=self.cfg.data.max_response_tokens, top_p=self.cfg.generation.top_p,
                                batch_size=self.cfg.generation.batch_size,
                                progress=lambda it, total: self.run.tracker.progress(it, total, desc=desc))
        k = num_samples
        local = [{"texts": samples.texts[i * k:(i + 1) * k], "finished": samples.finished[i * k],
                  "tokens": len(samples.response_ids[i * k])} for i in range(len(samples.texts) // k)]
        return gather(local, len(prompts))

    def exact_match(self, examples, name: str) -> tuple[dict, list[dict]]:
        data, ev = self.cfg.data, self.cfg.eval
        examples, overlong = fit_to_context(examples, examples, data, self.tokenizer, f"eval {name}")
        prompts = encode_prompts(examples, data, self.tokenizer)
        greedy = self.sample(prompts, 1, 0.0, f"eval {name}")
        rows = []
        for ex, text in zip(examples, (g["texts"][0] for g in greedy)):
            prediction = extract_answer(text)
            rows.append({"id": ex.id, "question": ex.question, "answer": ex.answer, "response": text,
                         "prediction": prediction, "correct": prediction == ex.answer})
        if data.task == TaskName.custom:
            # Prompt-completion data need not end in a number: the greedy response against the reference.
            for row, ex in zip(rows, examples):
                row.update(reference=gold_response(ex), rouge_l=rouge_l(row["response"].strip(), ex.solution.strip()))
        figures = {"n": len(rows), "overlong_prompts": overlong,
                   "accuracy": sum(r["correct"] for r in rows) / len(rows),
                   **({"rouge_l": sum(r["rouge_l"] for r in rows) / len(rows)} if data.task == TaskName.custom else {}),
                   "finished_fraction": sum(g["finished"] for g in greedy) / len(rows),
                   "mean_response_tokens": sum(g["tokens"] for g in greedy) / len(rows)}
        k = ev.num_samples
        if k > 1:
            for row, sampled in zip(rows, self.sample(prompts, k, ev.temperature, f"eval {name} n={k}")):
                texts = sampled["texts"]
                answers = [extract_answer(t) for t in texts]
                row.update(samples=texts, sampled_correct=sum(a == row["answer"] for a in answers),
                           majority_correct=majority(answers) == row["answer"])
            figures.update(sampled_figures([r["correct"] for r in rows], [r["sampled_correct"] for r in rows],
                                           [r["majority_correct"] for r in rows], k))
        return figures, rows

    def prompt_ids(self, texts: list[str]) -> list[list[int]]:
        data = self.cfg.data
        if data.use_chat_template:
            texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                        add_generation_prompt=True) for t in texts]
        ids = self.tokenizer(texts, add_special_tokens=not data.use_chat_template)["input_ids"]
        return [row[-data.max_prompt_tokens:] for row in ids]

    @torch.no_grad()
    def multiple_choice(self, items, bench: BenchmarkConfig) -> tuple[dict, list[dict]]:
        prompts = self.prompt_ids([bench.prompt_template.format(question=item.question) for item in items])
        local = shard(list(range(len(items))))
        rows = [(i, j) for i in local for j in range(len(items[i].choices))]
        continuations = self.tokenizer([" " + items[i].choices[j] for i, j in rows],
                                       add_special_tokens=False)["input_ids"]
        scores: list[float] = []
        device, size = next(self.model.parameters()).device, self.cfg.generation.batch_size
        for start in range(0, len(rows), size):
            part = rows[start:start + size]
            batch = collate([prompts[i] for i, _ in part], continuations[start:start + size],
                            self.tokenizer.pad_token_id).to(device)
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            scores += sequence_logprobs(logits[:, :-1], batch.input_ids[:, 1:],
                                        batch.response_mask[:, 1:]).sum(-1).tolist()
        per_item, at = [], 0
        for i in local:
            per_item.append(scores[at:at + len(items[i].choices)])
            at += len(items[i].choices)
        logprobs = gather(per_item, len(items))
        figures = multiple_choice_figures(logprobs, [[len(c) for c in item.choices] for item in items],
                                          [item.answer for item in items])
        rows = [{"id": item.id, "question": item.question, "choices": item.choices, "answer": item.answer,
                 "logprobs": lp, "prediction": max(range(len(lp)), key=lp.__getitem__)}
                for item, lp in zip(items, logprobs)]
        return {"n": len(items), **figures}, rows

    def instruction(self, items, bench: BenchmarkConfig, name: str) -> tuple[dict, list[dict]]:
        prompts = self.prompt_ids([instruction_prompt(item, bench.prompt_template) for item in items])
        answers = [g["texts"][0].strip() for g in self.sample(prompts, 1, 0.0, f"eval {name}")]
        rows = [{"id": item.id, "instruction": item.instruction, "context": item.context,
                 "reference": item.reference, "response": answer, "rouge_l": rouge_l(answer, item.reference)}
                for item, answer in zip(items, answers)]
        return {"n": len(rows), "rouge_l": sum(r["rouge_l"] for r in rows) / len(rows)}, rows


def evaluate_model(cfg: PbkdConfig, run: Run, role: str, benchmarks: dict[str, BenchmarkConfig],
                   out_dir: Path) -> dict[str, dict]:
    scorer = Scorer(cfg, run, role)
    results = {}
    for name, bench in benchmarks.items():
        key = f"eval.benchmarks.{name}"
        if bench.kind == BenchmarkKind.task:
            examples = load_examples(cfg.data, cfg.eval.split)[: cfg.eval.limit]
            if not examples:
                raise PbkdError(f"eval.split={cfg.eval.split}: no examples to evaluate")
            figures, rows = scorer.exact_match(examples, name)
        elif bench.kind == BenchmarkKind.gsm8k:
            figures, rows = scorer.exact_match(load_benchmark(bench, key), name)
        elif bench.kind == BenchmarkKind.multiple_choice:
            figures, rows = scorer.multiple_choice(load_benchmark(bench, key), bench)
        else:
            figures, rows = scorer.instruction(load_benchmark(bench, key), bench, name)
        if run.is_main:
            write_jsonl(out_dir / ("predictions.jsonl" if name == "task" else f"predictions-{name}.jsonl"), rows)
        results[name] = figures
    return results


def comparison_table(results: dict[str, dict[str, dict]], benchmarks: dict[str, BenchmarkConfig]) -> str:
    columns = [(name, metric) for name, bench in benchmarks.items() for metric in HEADLINE[bench.kind]]
    lines = ["| model | " + " | ".join(f"{name} {metric}" for name, metric in columns) + " |",
             "| --- |" + " ---: |" * len(columns)]
    for label, figures in results.items():
        lines.append(f"| {label} | " + " | ".join(f"{figures[name][metric]:.3f}" for name, metric in columns) + " |")
    return "\n".join(lines) + "\n"


def run(cfg: PbkdConfig, run: Run) -> dict:
    role = cfg.eval.model.value
    benchmarks = dict(cfg.eval.benchmarks) or {"task": BenchmarkConfig()}
    models = dict(cfg.eval.models) or {role: getattr(cfg.model, role).name_or_path}
    # Labels and benchmark names become file and directory names under the run directory.
    for label in cfg.eval.models:
        path_component(label, f"eval.models.{label}")
    for name in benchmarks:
        path_component(name, f"eval.benchmarks.{name}")
    results = {}
    for label, name_or_path in models.items():
        model_cfg = dataclasses.replace(getattr(cfg.model, role), name_or_path=name_or_path)
        one = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **{role: model_cfg}))
        out_dir = run.dir if len(models) == 1 else run.dir / label
        results[label] = evaluate_model(one, run, role, benchmarks, out_dir)
        run.tracker.log({f"{label}/{name}/{k}": v for name, figures in results[label].items()
                         for k, v in figures.items() if isinstance(v, float)}, step=0, prefix="eval/", reduce=False)
    table = comparison_table(results, benchmarks)
    if run.is_main:
        atomic_write_text(run.dir / "comparison.md", table)
    print(f"\n{table}", flush=True)
    summary = {"model": role, "split": cfg.eval.split,
               "models": {label: {"name_or_path": models[label], "benchmarks": figures}
                          for label, figures in results.items()}}
    if len(models) == 1:
        # One model: its figures at the top level too (the task's first), as `pipeline` reads them.
        (label, figures), = results.items()
        summary.update(name_or_path=models[label], **figures.get("task", next(iter(figures.values()))))
    return summary
