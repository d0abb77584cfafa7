"""Batched sampling with Hugging Face `generate`: left padding, KV cache, stop at eos."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

log = logging.getLogger("pbkd")


@dataclass
class Samples:
    """`num_samples` responses per prompt, grouped: rows i*k .. i*k+k-1 answer prompt i."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # generated tokens up to and including eos, no padding
    texts: list[str]
    finished: list[bool]  # False where max_new_tokens cut the response before eos
    num_samples: int

    @property
    def generated_tokens(self) -> int:
        return sum(len(r) for r in self.response_ids)

    def groups(self, kept: list[int]) -> "Samples":
        """The samples of the prompts at positions `kept`, in that order."""
        rows = [g * self.num_samples + j for g in kept for j in range(self.num_samples)]
        return Samples([self.prompt_ids[r] for r in rows], [self.response_ids[r] for r in rows],
                       [self.texts[r] for r in rows], [self.finished[r] for r in rows], self.num_samples)

    def joined(self, response_ids: list[list[list[int]]], texts: list[list[str]]) -> "Samples":
        """These samples with `response_ids[g]` (and their `texts[g]`) appended to group g: responses
        of another source (the teacher's answers) that the group's baseline then also covers. Every
        group gets the same number, so rows i*k' .. i*k'+k'-1 still answer prompt i."""
        extra = {len(r) for r in response_ids}
        if len(response_ids) != self.num_groups or len(extra) != 1 or [len(t) for t in texts] != [len(r) for r in response_ids]:
            raise ValueError(f"need the same number of responses (and texts) for each of the {self.num_groups} groups")
        k, m = self.num_samples, extra.pop()
        out = Samples([], [], [], [], k + m)
        for g in range(self.num_groups):
            rows = range(g * k, (g + 1) * k)
            prompt = self.prompt_ids[g * k]
            out.prompt_ids += [self.prompt_ids[r] for r in rows] + [prompt] * m
            out.response_ids += [self.response_ids[r] for r in rows] + response_ids[g]
            out.texts += [self.texts[r] for r in rows] + texts[g]
            out.finished += [self.finished[r] for r in rows] + [True] * m
        return out

    def head(self, k: int) -> "Samples":
        """The first `k` responses of every group (the student's own, of a `joined` group)."""
        rows = [g * self.num_samples + j for g in range(self.num_groups) for j in range(k)]
        return Samples([self.prompt_ids[r] for r in rows], [self.response_ids[r] for r in rows],
                       [self.texts[r] for r in rows], [self.finished[r] for r in rows], k)

    @property
    def num_groups(self) -> int:
        return len(self.response_ids) // self.num_samples


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, length - len(row):] = 1
    return ids, mask


# A batch still decoding after this long says how far it is, at most this often: a 0.5B model on a
# CPU can spend many minutes on one batch, and per-prompt progress moves only when a batch ends.
BATCH_HEARTBEAT_S = 30.0


def _stopping(should_stop: Callable[[], bool] | None, batch: int, batches: int, prompt_tokens: int,
              max_new_tokens: int):
    """The criteria `model.generate` is given: `should_stop` (None: none), and a heartbeat that logs
    the decoding step of a long batch (it never stops anything)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Until(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), should_stop(), dtype=torch.bool, device=input_ids.device)

    class Heartbeat(StoppingCriteria):
        def __init__(self):
            self.started = self.last = time.monotonic()

        def __call__(self, input_ids, scores, **kwargs):
            now = time.monotonic()
            if now - self.last >= BATCH_HEARTBEAT_S:
                step = input_ids.shape[1] - prompt_tokens
                log.info("generate: batch %d/%d, token %d/%d (%.3g tokens/s per row)", batch, batches, step,
                         max_new_tokens, step / (now - self.started))
                self.last = now
            return torch.zeros((input_ids.shape[0],), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Heartbeat(), *([Until()] if should_stop is not None else [])])


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], *, num_samples: int = 1, max_new_tokens: int,
             temperature: float, top_p: float = 1.0, batch_size: int = 64,
             progress: Callable[[Iterable, int], Iterable] = lambda it, total: it,
             should_stop: Callable[[], bool] | None = None) -> Samples:
    """Sample `num_samples` responses per prompt (`temperature == 0`: greedy, one per prompt).

    Prompts are batched in order of length so that little compute goes to padding; results come
    back in the caller's order. `should_stop` is asked after every decoding step; once it says True,
    the unfinished responses end where they are (`pbkd serve`: the client went away). `progress`
    counts prompts (a batch's prompts as it finishes), so rates and ETAs read in prompts.
    """
    greedy = temperature == 0
    if greedy and num_samples != 1:
        raise ValueError("greedy decoding gives one response per prompt; set temperature > 0")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    per_batch = max(1, batch_size // num_samples)
    batches = [order[i:i + per_batch] for i in range(0, len(order), per_batch)]
    responses: dict[int, list[list[int]]] = {}
    eos = tokenizer.eos_token_id
    # ZeRO-3 gathers each layer's weights from all ranks inside every forward pass, so the ranks must
    # keep decoding in step until the last of them is done (DeepSpeed marks its partitioned weights).
    synced = torch.distributed.is_initialized() and any(hasattr(p, "ds_id") for p in model.parameters())
    ticks = iter(progress(range(len(prompt_ids)), len(prompt_ids)))
    # The first tick starts the progress clock before the first batch (counting one prompt early), so
    # the rate covers every batch.
    ahead = int(next(ticks, None) is not None)
    for number, batch in enumerate(batches, start=1):
        ids, mask = _left_pad([prompt_ids[i] for i in batch], tokenizer.pad_token_id)
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=not greedy, temperature=None if greedy else temperature, top_p=None if greedy else top_p,
            top_k=None, num_return_sequences=num_samples, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos, use_cache=True, synced_gpus=synced, stopping_criteria=_stopping(should_stop, number, len(batches), ids.shape[1], max_new_tokens),
        )
        generated = out[:, ids.shape[1]:].tolist()
        for j, index in enumerate(batch):
            rows = []
            for row in generated[j * num_samples:(j + 1) * num_samples]:
                rows.append(row[: row.index(eos) + 1] if eos in row else row)
            responses[index] = rows
        for _ in range(len(batch) - ahead):
            next(ticks, None)
        ahead = 0
    for _ in ticks:  # closes the bar
        pass
    model.train(was_training)
    flat = [r for i in range(len(prompt_ids)) for r in responses[i]]
    return Samples(
        prompt_ids=[p for p in prompt_ids for _ in range(num_samples)],
        response_ids=flat,
        texts=tokenizer.batch_decode(flat, skip_special_tokens=True),
        finished=[bool(r) and r[-1] == eos for r in flat],
        num_samples=num_samples,
    )
