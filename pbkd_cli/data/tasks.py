"""The task a run trains and evaluates on, whichever source it comes from."""

from __future__ import annotations

from dataclasses import asdict

from pbkd_cli.config.schema import DataConfig, TaskName
from pbkd_cli.data.examples import Example


def _arithmetic_config(cfg: DataConfig):
    from pbkd_cli.data.arithmetic import ArithmeticTaskConfig

    fields = asdict(cfg.arithmetic)
    fields["operations"] = tuple(fields["operations"])
    return ArithmeticTaskConfig(**fields)


def load_examples(cfg: DataConfig, split: str) -> list[Example]:
    """Examples of `split` ("train" or "test"), cut to the split's limit."""
    limit = cfg.train_limit if split == "train" else cfg.test_limit
    if cfg.task == TaskName.arithmetic:
        from pbkd_cli.data.arithmetic import generate_arithmetic_examples

        examples = generate_arithmetic_examples(_arithmetic_config(cfg), split)
    elif cfg.task == TaskName.gsm8k:
        from pbkd_cli.data.gsm8k import load_gsm8k

        path_key = "train_path" if split == "train" else "test_path"
        examples = load_gsm8k(split, path=getattr(cfg, path_key), hub_id=cfg.hub_id, hub_config=cfg.hub_config,
                              path_key=f"data.{path_key}")
    else:
        from pbkd_cli.data.prompt_completion import load_prompt_completion

        path_key = "train_path" if split == "train" else "test_path"
        examples = load_prompt_completion(split, getattr(cfg, path_key), cfg.hub_id, cfg.hub_config,
                                          path_key=f"data.{path_key}")
    return examples[:limit] if limit is not None else examples


def tokenizer_corpus(cfg: DataConfig, size: int) -> list[str]:
    """Texts to train a from-scratch tokenizer on: the prompt template plus the task's own text."""
    if cfg.task == TaskName.arithmetic:
        from pbkd_cli.data.arithmetic import tokenizer_training_corpus

        texts = tokenizer_training_corpus(_arithmetic_config(cfg), n=size)
    else:
        texts = [text for ex in load_examples(cfg, "train")[:size]
                 for text in (ex.question, ex.solution, *(content for _, content in ex.messages))]
    return [cfg.prompt_template, *texts]
