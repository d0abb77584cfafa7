"""Prompts and responses as token ids: the one place text meets the tokenizer."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from typing import TypeVar

import torch

from pbkd_cli.config.schema import DataConfig, OverlongPrompts
from pbkd_cli.data.examples import Example
from pbkd_cli.io import PbkdError

log = logging.getLogger("pbkd")
T = TypeVar("T")


def chat_messages(example: Example, cfg: DataConfig) -> list[dict[str, str]]:
    """The prompt as chat messages: its own turns (prompt-completion data), else the question in
    `data.prompt_template` as one user turn."""
    if example.messages:
        return [{"role": role, "content": content} for role, content in example.messages]
    return [{"role": "user", "content": cfg.prompt_template.format(question=example.question)}]


def format_prompt(example: Example, cfg: DataConfig, tokenizer) -> str:
    """The prompt text a model continues: through the tokenizer's chat template with
    `data.use_chat_template`, else the template-filled question, or prompt-completion data's turns
    verbatim (joined by a blank line where there are several)."""
    if cfg.use_chat_template:
        return tokenizer.apply_chat_template(chat_messages(example, cfg), tokenize=False, add_generation_prompt=True)
    return plain_prompt(example, cfg)


def plain_prompt(example: Example, cfg: DataConfig) -> str:
    """The prompt without a chat template: the template-filled question, or prompt-completion data's
    turns verbatim (joined by a blank line where there are several)."""
    if example.messages:
        return "\n\n".join(content for _, content in example.messages)
    return cfg.prompt_template.format(question=example.question)


def gold_response(example: Example) -> str:
    """The reference response: prompt-completion data's completion verbatim; the math tasks' solution
    after a space, so that "Answer:" + response reads as the text it was trained on."""
    return example.solution if example.messages else " " + example.solution.strip()


@functools.lru_cache(maxsize=8)
def _longest_token(tokenizer) -> int:
    """Characters in the vocabulary's longest entry (no token covers more of a text). Cached per
    tokenizer object: a 150k vocabulary takes tens of milliseconds to list."""
    return max(map(len, tokenizer.get_vocab()))


def _prompt_ids(examples: list[Example], cfg: DataConfig, tokenizer) -> list[list[int]]:
    """Token ids of the formatted prompts. A question (each turn of a conversation) is first cut to its
    last characters that can still reach the prompt's last `max_prompt_tokens` tokens, so a huge one is
    not tokenised whole."""
    keep = cfg.max_prompt_tokens * _longest_token(tokenizer)

    def cut(ex: Example) -> Example:
        if len(ex.question) <= keep and all(len(content) <= keep for _, content in ex.messages):
            return ex
        return replace(ex, question=ex.question[-keep:], messages=tuple((r, c[-keep:]) for r, c in ex.messages))

    texts = [format_prompt(cut(ex), cfg, tokenizer) for ex in examples]
    return tokenizer(texts, add_special_tokens=not cfg.use_chat_template)["input_ids"]


def overlong(examples: list[Example], cfg: DataConfig, tokenizer) -> list[bool]:
    """Which examples' formatted prompts exceed `max_prompt_tokens`."""
    return [len(row) > cfg.max_prompt_tokens for row in _prompt_ids(examples, cfg, tokenizer)]


def fit_to_context(items: list[T], examples: list[Example], cfg: DataConfig, tokenizer, what: str) -> tuple[list[T], int]:
    """`items` (one per example) without those whose prompt is too long when `overlong_prompts=drop`
    (with `truncate`, `encode_prompts` keeps their last tokens), and how many were too long."""
    too_long = overlong(examples, cfg, tokenizer)
    count = sum(too_long)
    if count:
        action = "dropped" if cfg.overlong_prompts == OverlongPrompts.drop else "truncated to their last tokens"
        log.warning("%s: %d of %d prompts exceed data.max_prompt_tokens=%d and are %s",
                    what, count, len(items), cfg.max_prompt_tokens, action)
    if cfg.overlong_prompts == OverlongPrompts.drop:
        items = [item for item, bad in zip(items, too_long) if not bad]
        if not items:
            raise PbkdError(f"data.max_prompt_tokens={cfg.max_prompt_tokens}: every {what} prompt is longer "
                            f"(data.overlong_prompts=drop left nothing)")
    return items, count


def encode_prompts(examples: list[Example], cfg: DataConfig, tokenizer) -> list[list[int]]:
    """Prompt ids, keeping the last `max_prompt_tokens` (the question's end holds what is asked)."""
    return [row[-cfg.max_prompt_tokens:] for row in _prompt_ids(examples, cfg, tokenizer)]


def encode_responses(responses: list[str], cfg: DataConfig, tokenizer) -> list[list[int]]:
    """Response ids ending in eos (so the model learns to stop), cut to `max_response_tokens`."""
    ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    return [(row + [tokenizer.eos_token_id])[: cfg.max_response_tokens] for row in ids]


@dataclass
class TokenBatch:
    """Right-padded prompt+response rows; `response_mask` marks the tokens that carry the loss."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor

    def to(self, device: torch.device) -> "TokenBatch":
        return TokenBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.response_mask)))

    def rows(self, rows: slice) -> "TokenBatch":
        return TokenBatch(self.input_ids[rows], self.attention_mask[rows], self.response_mask[rows])


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> TokenBatch:
    length = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    response_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        n, m = len(prompt), len(response)
        input_ids[row, : n + m] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[row, : n + m] = 1
        response_mask[row, n : n + m] = 1
    return TokenBatch(input_ids, attention_mask, response_mask)


def pair_batch(prompts, chosen, rejected, idx, pad_id) -> TokenBatch:
    """Chosen rows then rejected rows of the same prompts, in one padded batch."""
    rows = [prompts[i] for i in idx]
    return collate(rows + rows, [chosen[i] for i in idx] + [rejected[i] for i in idx], pad_id)


def pair_examples(pairs) -> list[Example]:
    """The prompts of preference pairs as examples: the question in the task's template where the pair
    names one, else its conversation (TRL's conversational prompt) or its prompt text as one user turn."""
    def turns(p) -> tuple[tuple[str, str], ...]:
        if p.messages:
            return tuple((m["role"], m["content"]) for m in p.messages)
        return () if p.question else (("user", p.prompt),)

    return [Example(id=p.id, question=p.question, solution="", answer=p.answer, messages=turns(p)) for p in pairs]


def encode_pairs(pairs, cfg: DataConfig, tokenizer) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """(prompt, chosen, rejected) ids of preference pairs, prompts rebuilt from their questions or turns
    (`pair_examples`).

    Each model formats the prompt with its own tokenizer (and chat template, as SFT and eval do), so a
    pair written from one model family trains a reward model of another.
    """
    prompts = encode_prompts(pair_examples(pairs), cfg, tokenizer)
    chosen = encode_responses([p.chosen for p in pairs], cfg, tokenizer)
    rejected = encode_responses([p.rejected for p in pairs], cfg, tokenizer)
    return prompts, chosen, rejected
