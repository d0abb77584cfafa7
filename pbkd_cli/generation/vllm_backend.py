"""Sampling with vLLM (optional extra `pbkd-cli[vllm]`, GPU only) for collection and evaluation.

It serves models that sit in a directory or on the hub and do not change during the run (the
teacher, a judge, the student being evaluated or collected from); the min-max game samples from a
policy that changes every iteration and stays on Hugging Face `generate`.
"""

from __future__ import annotations

import importlib.util

import torch

from pbkd_cli.config.schema import GenerationBackend, ModelConfig
from pbkd_cli.generation.hf import Samples
from pbkd_cli.io import PbkdError


def use_vllm(backend: GenerationBackend, model: ModelConfig, key: str) -> bool:
    """Whether `model` samples with vLLM: asked for, or `auto` with vLLM installed and a GPU present."""
    available = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    if backend == GenerationBackend.hf:
        return False
    if backend == GenerationBackend.auto:
        return available and model.name_or_path is not None and model.gguf_file is None
    if not available:
        raise PbkdError("generation.backend=vllm: needs vLLM installed (pip install 'pbkd-cli[vllm]') and a GPU")
    if model.name_or_path is None:
        raise PbkdError(f"generation.backend=vllm: {key} has no name_or_path (vLLM loads models from a directory or the hub)")
    return True


def samples_from_outputs(outputs, prompt_ids: list[list[int]], num_samples: int, eos: int, tokenizer) -> Samples:
    """vLLM's `RequestOutput`s (one per prompt, `num_samples` completions each) as `Samples`."""
    responses, finished = [], []
    for output in outputs:
        for completion in output.outputs[:num_samples]:
            ids = list(completion.token_ids)
            stopped = completion.finish_reason == "stop"
            if stopped and (not ids or ids[-1] != eos):
                ids.append(eos)  # vLLM leaves the stop token out; HF generate keeps it
            responses.append(ids)
            finished.append(stopped)
    return Samples(prompt_ids=[p for p in prompt_ids for _ in range(num_samples)], response_ids=responses,
                   texts=tokenizer.batch_decode(responses, skip_special_tokens=True), finished=finished,
                   num_samples=num_samples)


class VLLMGenerator:
    def __init__(self, model: ModelConfig, tokenizer, seed: int):
        from vllm import LLM

        self.tokenizer = tokenizer
        self.llm = LLM(model=model.name_or_path, revision=model.revision, dtype=model.dtype.value,
                       trust_remote_code=model.trust_remote_code, seed=seed)

    def generate(self, prompt_ids: list[list[int]], *, num_samples: int = 1, max_new_tokens: int,
                 temperature: float, top_p: float = 1.0, **_) -> Samples:
        from vllm import SamplingParams

        eos = self.tokenizer.eos_token_id
        params = SamplingParams(n=num_samples, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                max_tokens=max_new_tokens, stop_token_ids=[eos])
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        return samples_from_outputs(outputs, prompt_ids, num_samples, eos, self.tokenizer)
