"""`eval` on several checkpoints and every benchmark format (the shipped fixtures), one table."""

from __future__ import annotations

import json

import torch

from .conftest import TINY, ok, pbkd, summary


def test_eval_scores_two_models_on_every_fixture_format(workdir, trained_teacher):
    run_dir = workdir / "eval_suite"
    ok(pbkd("eval", *TINY, "benchmarks=fixtures", "eval.limit=8", f"+eval.models.teacher={trained_teacher}",
            "+eval.models.scratch=null", f"hydra.run.dir={run_dir}", cwd=workdir))
    result = summary(run_dir)
    assert list(result["models"]) == ["teacher", "scratch"]
    for label in ("teacher", "scratch"):
        figures = result["models"][label]["benchmarks"]
        assert set(figures) == {"task", "gsm8k", "arc", "mmlu", "dolly", "self_instruct"}
        assert figures["task"]["n"] == 8 and figures["arc"]["n"] == 4 and figures["dolly"]["n"] == 4
        for name in ("arc", "mmlu"):
            assert {"accuracy", "accuracy_norm"} <= set(figures[name])
        assert 0.0 <= figures["dolly"]["rouge_l"] <= 1.0
        for name in figures:
            predictions = run_dir / label / ("predictions.jsonl" if name == "task" else f"predictions-{name}.jsonl")
            assert len(predictions.read_text().splitlines()) == figures[name]["n"]
    table = (run_dir / "comparison.md").read_text().splitlines()
    assert table[0].startswith("| model | task accuracy | gsm8k accuracy | arc accuracy | arc accuracy_norm")
    assert [row.split(" | ")[0] for row in table[2:]] == ["| teacher", "| scratch"]

    # The multiple-choice scores are the model's log-likelihoods of " <choice>" after the prompt.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained_teacher)
    model = AutoModelForCausalLM.from_pretrained(trained_teacher).eval()
    row = json.loads((run_dir / "teacher" / "predictions-mmlu.jsonl").read_text().splitlines()[0])
    prompt = tokenizer(f"{row['question']}\nAnswer:")["input_ids"]
    for choice, logged in zip(row["choices"], row["logprobs"]):
        continuation = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + continuation])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        expected = sum(logp[len(prompt) - 1 + t, token].item() for t, token in enumerate(continuation))
        assert abs(logged - expected) < 1e-4
    assert row["prediction"] == max(range(len(row["logprobs"])), key=row["logprobs"].__getitem__)
