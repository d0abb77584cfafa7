"""What the objectives read off a causal LM: next-token logits, probabilities and the log-probabilities of
the tokens taken.

Position h of every `[B, T-1, ...]` tensor here is the state before token `input_ids[:, h + 1]`, so
`actions = input_ids[:, 1:]` and `mask = response_mask[:, 1:]` line up with it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from pbkd_cli.data.prompts import TokenBatch
from pbkd_cli.models.lora import AdapterDisabled, unwrapped
from pbkd_cli.objectives.policy_gradient import sequence_logprobs


def next_token_logits(model, batch: TokenBatch, vocab_size: int | None = None) -> torch.Tensor:
    """`[B, T-1, V]` logits of the states before each next token, cut to the tokenizer's vocabulary when
    given (checkpoints pad their output layer to different sizes, e.g. Qwen2.5 0.5B and 7B)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits[:, :-1, :vocab_size]


@torch.no_grad()
def next_token_probs(model, batch: TokenBatch, vocab_size: int) -> torch.Tensor:
    """A frozen policy's π(. | s_h) (the teacher's, or the student's π_old), `[B, T-1, V]`, in at least float32."""
    logits = next_token_logits(model, batch, vocab_size)
    return torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))


@dataclass(frozen=True)
class SharedPrompts:
    """A batch's rows cut before their last prompt token: each distinct prefix (the prompt less its last
    token) once, and every row's suffix (that last token, then the response) to run against the keys and
    values its prefix leaves in the KV cache.

    A game scores and trains on groups of samples of one prompt (and a preference pair repeats its
    prompt), so each prompt is otherwise run once per row: with 4 samples of 30-token prompts and
    48-token responses, the suffixes and one prefix per group are 30% fewer tokens than the rows."""

    prefix_ids: torch.Tensor  # [U, P], right-padded
    prefix_mask: torch.Tensor  # [U, P]
    row_prefix: torch.Tensor  # [B]: the prefix each row continues
    suffix_ids: torch.Tensor  # [B, S], right-padded with pad_id
    suffix_mask: torch.Tensor  # [B, S]
    suffix_positions: torch.Tensor  # [B, S]: the suffix's positions in its row

    @property
    def attention_mask(self) -> torch.Tensor:
        """[B, P + S]: what each suffix token may attend to, cached prefix and suffix."""
        return torch.cat([self.prefix_mask[self.row_prefix], self.suffix_mask], dim=1)


# Below this share of the rows' tokens saved, one forward over the rows costs less than two calls.
MIN_TOKENS_SAVED = 0.1


def share_prompts(batch: TokenBatch, pad_id: int) -> SharedPrompts | None:
    """`batch` as `SharedPrompts` where rows repeat a prompt enough to save `MIN_TOKENS_SAVED` of the
    tokens, else None (also for rows that are not a prompt of at least 2 tokens, then a response that
    runs to the row's end, then padding: the layout `collate` writes)."""
    attention, response = batch.attention_mask.bool(), batch.response_mask.bool()
    rows, width = batch.input_ids.shape
    lengths = attention.sum(1)
    starts = torch.where(response.any(1), response.int().argmax(1), lengths)  # prompt lengths
    columns = torch.arange(width, device=batch.input_ids.device)
    if (not torch.equal(attention, columns < lengths[:, None])
            or not torch.equal(response, (columns >= starts[:, None]) & attention) or bool((starts < 2).any())):
        return None
    ids, cuts = batch.input_ids.tolist(), (starts - 1).tolist()
    keys = [tuple(ids[r][:cuts[r]]) for r in range(rows)]
    first_row: dict[tuple[int, ...], int] = {}
    for r, key in enumerate(keys):
        first_row.setdefault(key, r)
    prefix_rows = list(first_row.values())
    number = {key: u for u, key in enumerate(first_row)}
    row_prefix = [number[key] for key in keys]
    prefix_width = max(cuts[r] for r in prefix_rows)
    suffix_lengths = lengths - starts + 1
    suffix_width = int(suffix_lengths.max())
    if len(prefix_rows) * prefix_width + rows * suffix_width > (1 - MIN_TOKENS_SAVED) * rows * width:
        return None
    prefix_index = torch.tensor(prefix_rows, device=batch.input_ids.device)
    prefix_lengths = (starts - 1)[prefix_index]
    prefix_mask = (columns[:prefix_width] < prefix_lengths[:, None]).long()
    prefix_ids = batch.input_ids[prefix_index, :prefix_width].masked_fill(prefix_mask == 0, pad_id)
    offsets = torch.arange(suffix_width, device=batch.input_ids.device)
    suffix_mask = offsets < suffix_lengths[:, None]
    # Padding past a row's end sits at its last position (a learnt position table has no more).
    positions = ((starts - 1)[:, None] + offsets).clamp(max=width - 1)
    suffix_ids = batch.input_ids.gather(1, positions).masked_fill(~suffix_mask, pad_id)
    return SharedPrompts(prefix_ids, prefix_mask, torch.tensor(row_prefix, device=batch.input_ids.device),
                         suffix_ids, suffix_mask.long(), positions)


def _transformers_model(model):
    """The transformers model a DeepSpeed engine, PEFT wrapper or `AdapterDisabled` runs."""
    return unwrapped(model.model if isinstance(model, AdapterDisabled) else model)


def shared_prompt_forward(model, batch: TokenBatch, forward=None):
    """(the suffixes' output, their `SharedPrompts`) of `forward` (default: `model` itself, a DeepSpeed
    engine, PEFT model or `AdapterDisabled` as well) run once over each distinct prefix and once over the
    suffixes against the prefixes' cached keys and values, or None where that does not pay or cannot be
    done: no prompt repeats enough, gradient checkpointing in training (it turns the cache off), a model
    with another cache than transformers' `DynamicCache`.

    The suffixes' outputs equal those of the same tokens in a forward over the whole rows (to float
    rounding): each attends to its own prefix and suffix and sits at its row's positions."""
    from transformers import DynamicCache

    module = _transformers_model(model)
    config = getattr(module, "config", None)
    # transformers 5 renamed is_gradient_checkpointing (which now warns) to is_activation_checkpointing.
    checkpointing = next((getattr(module, name) for name in ("is_activation_checkpointing", "is_gradient_checkpointing")
                          if hasattr(type(module), name)), False)
    if config is None or config.is_encoder_decoder or (checkpointing and module.training and torch.is_grad_enabled()):
        return None
    split = share_prompts(batch, config.pad_token_id if config.pad_token_id is not None else 0)
    if split is None:
        return None
    forward = model if forward is None else forward
    parameters = inspect.signature(module.forward).parameters
    cache_key = "cache" if "cache" in parameters else "past_key_values"
    # The prefixes' own outputs are never read: a causal LM computes logits for their last position only.
    skip_logits = {"logits_to_keep": 1} if "logits_to_keep" in parameters and forward is model else {}
    out = forward(input_ids=split.prefix_ids, attention_mask=split.prefix_mask, use_cache=True, **skip_logits)
    cache = getattr(out, "cache", None)
    cache = getattr(out, "past_key_values", None) if cache is None else cache
    if not isinstance(cache, DynamicCache):
        return None
    cache.batch_select_indices(split.row_prefix)
    out = forward(input_ids=split.suffix_ids, attention_mask=split.attention_mask,
                  position_ids=split.suffix_positions, use_cache=True, **{cache_key: cache})
    return out, split


def response_logprobs(model, batch: TokenBatch, vocab_size: int | None = None,
                      temperature: float = 1.0) -> torch.Tensor:
    """`[B, T-1]` log pi_T(a_t | s_t) of every response token of `batch`, zero off the response: the
    log-probabilities of `next_token_logits(model, batch, vocab_size) / temperature`, computing each
    distinct prompt once where rows share it (`shared_prompt_forward`)."""
    shared = shared_prompt_forward(model, batch)
    if shared is None:
        logits = next_token_logits(model, batch, vocab_size)
        return sequence_logprobs(logits / temperature, batch.input_ids[:, 1:], batch.response_mask[:, 1:])
    out, split = shared
    logprobs = sequence_logprobs(out.logits[:, :-1, :vocab_size] / temperature, split.suffix_ids[:, 1:],
                                 split.suffix_mask[:, 1:])
    # Suffix position j predicts its token j + 1, the row's token at suffix_positions[:, j + 1].
    index = split.suffix_positions[:, :-1].clamp(max=batch.input_ids.shape[1] - 2)
    return logprobs.new_zeros(batch.input_ids.shape[0], batch.input_ids.shape[1] - 1).scatter_add(1, index, logprobs)


@torch.no_grad()
def token_logprobs(model, batch: TokenBatch, micro_batch_size: int, vocab_size: int | None = None,
                   temperature: float = 1.0) -> torch.Tensor:
    """log pi_T(a_t | s_t) of every response token of `batch` ([B, T-1], zero off the response), over
    the first `vocab_size` logits when given, `micro_batch_size` rows at a time.

    pi_T = softmax(logits / temperature) is the policy a game samples from, so it is the one whose
    probabilities the policy gradient and its ratios use."""
    out = []
    for start in range(0, batch.input_ids.shape[0], micro_batch_size):
        out.append(response_logprobs(model, batch.rows(slice(start, start + micro_batch_size)), vocab_size,
                                     temperature))
    return torch.cat(out)


def hidden_state_head(model):
    """(decoder, output-layer weight `[V, d]`) of a causal LM whose logits are exactly
    `decoder(...).last_hidden_state @ weight.T`, with its weights whole on this rank, or None: a
    ZeRO-3 engine partitions them; a head with a bias, scaled or soft-capped logits (Cohere, Gemma 2)
    compute other logits. `model` may be a DeepSpeed engine; one with DeepSpeed's `torch_autocast` on
    gets None too, as that autocast is entered only by the engine's own forward."""
    if any(getattr(model, name, lambda: False)() for name in ("zero_optimization_partition_weights",
                                                              "torch_autocast_enabled")):
        return None
    module = unwrapped(model)  # a LoRA model's adapters live in its decoder's layers
    head, config = module.get_output_embeddings(), module.config
    if type(head) is not torch.nn.Linear or head.bias is not None or module.base_model is module:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None
    return module.base_model, head.weight


def final_hidden_states(decoder, batch: TokenBatch) -> torch.Tensor:
    """`[B, T-1, d]`: the decoder's last hidden state before each next token."""
    return decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state[:, :-1]
