"""Responses of a run's models as the stages ask for them: the one place that reads
`generation.backend` and `model.<role>.api` to choose how a model samples."""

from __future__ import annotations

from functools import partial

from pbkd_cli.config.schema import PbkdConfig
from pbkd_cli.data.prompts import chat_messages, encode_prompts
from pbkd_cli.engine import inference_device
from pbkd_cli.generation.hf import generate
from pbkd_cli.models.roles import load_lm, load_role_tokenizer


def endpoint(api, key: str):
    """A `ChatEndpoint` for an `ApiConfig`, or None when it names no `base_url`."""
    from pbkd_cli.generation.openai_api import ChatEndpoint

    if api.base_url is None:
        return None
    return ChatEndpoint(base_url=api.base_url, model=api.model, api_key_env=api.api_key_env,
                        timeout_s=api.timeout_s, max_retries=api.max_retries, concurrency=api.concurrency,
                        cache_dir=api.cache_dir, config_key=key)


def load_sampling_model(cfg: PbkdConfig, role: str):
    """(tokenizer, HF model or None, `sample(prompt_ids, num_samples=, ...) -> Samples`) for a model that
    samples: vLLM's engine (no HF model then) or Hugging Face `generate`, as `generation.backend` says."""
    from pbkd_cli.generation.vllm_backend import VLLMGenerator, use_vllm

    model_cfg = getattr(cfg.model, role)
    if use_vllm(cfg.generation.backend, model_cfg, f"model.{role}"):
        tokenizer = load_role_tokenizer(cfg, role)
        return tokenizer, None, VLLMGenerator(model_cfg, tokenizer, cfg.seed).generate
    tokenizer, model = load_lm(cfg, role)
    model = model.to(inference_device())
    return tokenizer, model, partial(generate, model, tokenizer)


class ResponseSampler:
    """k responses per example as text, from a local model or an OpenAI-compatible endpoint."""

    def __init__(self, cfg: PbkdConfig, role: str, model=None, tokenizer=None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.generated_tokens = 0  # by the local model, for throughput figures
        self.api = endpoint(getattr(cfg.model, role).api, f"model.{role}.api")
        if self.api is not None:
            return
        if model is None:
            self.tokenizer, _, self.generate = load_sampling_model(cfg, role)
        else:
            self.generate = partial(generate, model, tokenizer)

    def sample(self, examples, k: int, temperature: float, progress=None) -> list[list[str]]:
        data = self.cfg.data
        if self.api is not None:
            chats = [chat_messages(ex, data) for ex in examples]
            return self.api.complete_many(chats, temperature=temperature, max_tokens=data.max_response_tokens, n=k)
        samples = self.generate(encode_prompts(examples, data, self.tokenizer),
                         num_samples=k, temperature=temperature, top_p=self.cfg.generation.top_p,
                         max_new_tokens=data.max_response_tokens, batch_size=self.cfg.generation.batch_size,
                         **({"progress": progress} if progress else {}))
        self.generated_tokens += samples.generated_tokens
        return [samples.texts[i * k:(i + 1) * k] for i in range(len(examples))]
