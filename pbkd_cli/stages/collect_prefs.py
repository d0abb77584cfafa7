"""Collect preference pairs: sample teacher and student on each prompt, rank, append to D_pref.

Prompts are processed in chunks; each chunk is seeded from (seed, its position) and committed as a
whole, so a run killed at any point and started again in the same directory ends with exactly the
pairs an uninterrupted run would have written.
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

from pbkd_cli.config.schema import Labeler, PbkdConfig, PrefsFormat
from pbkd_cli.data import labelers
from pbkd_cli.data.gsm8k import extract_answer
from pbkd_cli.data.preferences import PreferencePair, PreferenceWriter
from pbkd_cli.data.prompts import chat_messages, fit_to_context, plain_prompt
from pbkd_cli.data.tasks import load_examples
from pbkd_cli.engine import gather, reduce_metrics, seed_everything, shard
from pbkd_cli.generation.sampler import ResponseSampler, endpoint
from pbkd_cli.io import PbkdError
from pbkd_cli.runner import Run

log = logging.getLogger("pbkd")


def rank(cfg: PbkdConfig, examples, teacher_texts, student_texts, rng: random.Random):
    """The labeler's pairs for each example of a chunk."""
    c = cfg.collect_prefs
    per_example = []
    for ex, t_texts, s_texts in zip(examples, teacher_texts, student_texts):
        teacher = [labelers.Candidate(t, "teacher") for t in t_texts]
        student = [labelers.Candidate(s, "student") for s in s_texts]
        if c.labeler == Labeler.correctness:
            per_example.append(labelers.correctness(teacher + student, ex.answer, c.max_pairs_per_prompt,
                                                    c.check_equations))
        else:
            per_example.append(labelers.teacher_preferred(teacher, student, c.max_pairs_per_prompt))
    if c.labeler == Labeler.llm_judge:
        judge = endpoint(c.judge, "collect_prefs.judge")
        if judge is None:
            raise PbkdError("collect_prefs.judge.base_url: the llm_judge labeler needs an endpoint")
        flat = [(ex.question, (p.chosen, p.rejected)) for ex, pairs in zip(examples, per_example) for p in pairs]
        verdicts = iter(labelers.judge_pairs(judge, [q for q, _ in flat], [p for _, p in flat], rng))
        per_example = [[v for v in (next(verdicts) for _ in pairs) if v is not None] for pairs in per_example]
    return per_example


def run(cfg: PbkdConfig, run: Run) -> dict:
    c = cfg.collect_prefs
    train = load_examples(cfg.data, "train")
    end = None if c.num_prompts is None else c.prompt_offset + c.num_prompts
    examples = train[c.prompt_offset:end]
    if not examples:
        raise PbkdError(f"collect_prefs.prompt_offset={c.prompt_offset}: no train prompts left "
                        f"(the split has {len(train)})")
    # Rank 0 writes; every rank samples its share of each chunk.
    writer = PreferenceWriter(run.dir / "prefs.jsonl", read_only=not run.is_main)
    if writer.prompts_done:
        log.info("collect-prefs: resuming after %d of %d prompts", writer.prompts_done, len(examples))

    teacher = ResponseSampler(cfg, "teacher")
    student = ResponseSampler(cfg, "student")
    examples, overlong = fit_to_context(examples, examples, cfg.data, student.tokenizer, "collect-prefs")
    starts = range(writer.prompts_done, len(examples), c.chunk_prompts)
    for start in run.tracker.progress(starts, total=len(starts), desc="collect-prefs"):
        chunk = examples[start:start + c.chunk_prompts]
        # A chunk's samples depend only on (seed, chunk start), so a redone chunk is the same chunk.
        seed_everything(cfg.seed * 1_000_003 + c.prompt_offset + start)
        clock, tokens_before = time.perf_counter(), teacher.generated_tokens + student.generated_tokens
        teacher_texts = gather(teacher.sample(shard(chunk), c.samples_per_model, c.temperature), len(chunk))
        student_texts = gather(student.sample(shard(chunk), c.samples_per_model, c.temperature), len(chunk))
        sampling_seconds = time.perf_counter() - clock
        tokens = reduce_metrics({"tokens_per_second": (teacher.generated_tokens + student.generated_tokens
                                                       - tokens_before) / sampling_seconds})
        if not run.is_main:
            continue
        ranked = rank(cfg, chunk, teacher_texts, student_texts, random.Random(cfg.seed + start))
        pairs = [
            PreferencePair(id=f"{ex.id}-it{c.iteration}-{j}", prompt=plain_prompt(ex, cfg.data),
                           messages=chat_messages(ex, cfg.data) if ex.messages else [],
                           chosen=p.chosen.text, rejected=p.rejected.text, question=ex.question, answer=ex.answer,
                           chosen_source=p.chosen.source, rejected_source=p.rejected.source,
                           labeler=c.labeler.value, iteration=c.iteration)
            for ex, ex_pairs in zip(chunk, ranked) for j, p in enumerate(ex_pairs)
        ]
        correct = {
            "teacher_correct": sum(extract_answer(t) == ex.answer for ex, ts in zip(chunk, teacher_texts) for t in ts),
            "student_correct": sum(extract_answer(s) == ex.answer for ex, ss in zip(chunk, student_texts) for s in ss),
            "samples_per_model": len(chunk) * c.samples_per_model,
        }
        writer.append_chunk(pairs, len(chunk), stats=correct)
        run.tracker.log({"pairs": writer.pairs, "prompts": writer.prompts_done, **tokens},
                        step=writer.prompts_done, prefix="prefs/", reduce=False)

    path = writer.final_path.with_suffix(".parquet" if c.format == PrefsFormat.parquet else ".jsonl")
    if run.is_main:
        writer.finalize()
        if c.format == PrefsFormat.parquet:
            export_parquet(writer.final_path)
    stats = writer.stats
    return {
        "prefs_path": str(path),
        "prompts": len(examples),
        "pairs": writer.pairs,
        "overlong_prompts": overlong,
        "labeler": c.labeler.value,
        "teacher_sample_accuracy": stats.get("teacher_correct", 0) / max(stats.get("samples_per_model", 0), 1),
        "student_sample_accuracy": stats.get("student_correct", 0) / max(stats.get("samples_per_model", 0), 1),
    }


def export_parquet(jsonl_path: Path) -> Path:
    """The same pairs as Parquet through `datasets`, for tools that read the hub's format."""
    from datasets import load_dataset

    target = jsonl_path.with_suffix(".parquet")
    tmp = target.with_name(f".{target.name}.tmp")
    load_dataset("json", data_files=str(jsonl_path), split="train").to_parquet(str(tmp))
    os.replace(tmp, target)
    return target
