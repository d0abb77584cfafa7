"""Loading steps every stage shares, so that stage files keep to their algorithm."""

from __future__ import annotations

import logging
from functools import partial
from typing import Iterator

import torch

from pbkd_cli.config.schema import PbkdConfig
from pbkd_cli.data.tasks import tokenizer_corpus
from pbkd_cli.engine import distributed_context, inference_device
from pbkd_cli.io import PbkdError
from pbkd_cli.models import load_causal_lm, load_tokenizer
from pbkd_cli.models.factory import parameter_count

log = logging.getLogger("pbkd")


def load_role_tokenizer(cfg: PbkdConfig, role: str):
    """The tokenizer of `model.<role>`; from-scratch models get the one built from the task's corpus."""
    return load_tokenizer(getattr(cfg.model, role), f"model.{role}", cfg.tokenizer,
                          corpus=lambda: tokenizer_corpus(cfg.data, cfg.tokenizer.corpus_size))


def load_lm(cfg: PbkdConfig, role: str):
    """(tokenizer, causal LM) for `model.<role>`."""
    model_cfg = getattr(cfg.model, role)
    key = f"model.{role}"
    tokenizer = load_role_tokenizer(cfg, role)
    model = load_causal_lm(model_cfg, tokenizer, key)
    log.info("%s: %s (%.2fM parameters)", key, model_cfg.name_or_path or "tiny Llama from scratch",
             parameter_count(model) / 1e6)
    return tokenizer, model


class Minibatches:
    """Endless shuffled index batches, one fresh permutation per epoch; each rank gets its share.

    Its position (`state_dict`) goes into checkpoints: a resumed loop draws the batches it would
    have drawn.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.taken = 0
        self._batches = self._generate()

    def _generate(self) -> Iterator[list[int]]:
        dist = distributed_context()
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            order = torch.randperm(self.n, generator=generator).tolist()[dist.rank::dist.world_size]
            if len(order) < self.batch_size:
                raise PbkdError(f"trainer.micro_batch_size={self.batch_size} exceeds the {len(order)} "
                                f"examples per rank")
            for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
                yield order[start:start + self.batch_size]

    def __iter__(self) -> "Minibatches":
        return self

    def __next__(self) -> list[int]:
        self.taken += 1
        return next(self._batches)

    def state_dict(self) -> dict:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.taken, self._batches = 0, self._generate()
        for _ in range(state["taken"]):
            next(self)


def endpoint(api, key: str):
    """A `ChatEndpoint` for an `ApiConfig`, or None when it names no `base_url`."""
    from pbkd_cli.generation.openai_api import ChatEndpoint

    if api.base_url is None:
        return None
    return ChatEndpoint(base_url=api.base_url, model=api.model, api_key_env=api.api_key_env,
                        timeout_s=api.timeout_s, max_retries=api.max_retries, concurrency=api.concurrency,
                        cache_dir=api.cache_dir,
                        config_key=key)


def load_sampling_model(cfg: PbkdConfig, role: str):
    """(tokenizer, HF model or None, vLLM generator or None) for a model that only samples."""
    from pbkd_cli.generation.vllm_backend import VLLMGenerator, use_vllm

    model_cfg = getattr(cfg.model, role)
    if use_vllm(cfg.generation.backend, model_cfg, f"model.{role}"):
        tokenizer = load_role_tokenizer(cfg, role)
        return tokenizer, None, VLLMGenerator(model_cfg, tokenizer, cfg.seed)
    tokenizer, model = load_lm(cfg, role)
    return tokenizer, model.to(inference_device()), None


class ResponseSampler:
    """k responses per example as text, from a local model or an OpenAI-compatible endpoint."""

    def __init__(self, cfg: PbkdConfig, role: str, model=None, tokenizer=None):
        self.cfg = cfg
        self.tokenizer, self.model = tokenizer, model
        self.generated_tokens = 0  # by the local model, for throughput figures
        self.api = endpoint(getattr(cfg.model, role).api, f"model.{role}.api")
        self.vllm = None
        if self.api is None and model is None:
            self.tokenizer, self.model, self.vllm = load_sampling_model(cfg, role)

    def sample(self, examples, k: int, temperature: float, progress=None) -> list[list[str]]:
        from pbkd_cli.data.prompts import encode_prompts
        from pbkd_cli.generation import generate

        data = self.cfg.data
        if self.api is not None:
            chats = [[{"role": "user", "content": data.prompt_template.format(question=ex.question)}]
                     for ex in examples]
            return self.api.complete_many(chats, temperature=temperature, max_tokens=data.max_response_tokens, n=k)
        sample = self.vllm.generate if self.vllm is not None else partial(generate, self.model, self.tokenizer)
        samples = sample(encode_prompts(examples, data, self.tokenizer),
                         num_samples=k, temperature=temperature, top_p=self.cfg.generation.top_p,
                         max_new_tokens=data.max_response_tokens, batch_size=self.cfg.generation.batch_size,
                         **({"progress": progress} if progress else {}))
        self.generated_tokens += samples.generated_tokens
        return [samples.texts[i * k:(i + 1) * k] for i in range(len(examples))]


def load_rm(cfg: PbkdConfig):
    """(tokenizer, reward model) for `model.rm`: a trained RM, or a value head on a backbone."""
    from pbkd_cli.models.reward import load_reward_model

    tokenizer = load_role_tokenizer(cfg, "rm")
    return tokenizer, load_reward_model(cfg.model.rm, tokenizer, cfg.train_rm.pooling)


@torch.no_grad()
def batched_rewards(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                    batch_size: int, reward=None) -> torch.Tensor:
    """Rewards of many (prompt, response) rows without building a graph; `reward(model, batch)`
    defaults to the scalar RM's `score`."""
    from pbkd_cli.data.prompts import collate
    from pbkd_cli.models.reward import score

    reward = reward or score
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = collate(prompts[start:start + batch_size], responses[start:start + batch_size], pad_id).to(device)
        out.append(reward(model, batch).cpu())
    return torch.cat(out) if out else torch.zeros(0)
