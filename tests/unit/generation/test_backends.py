"""Backend choice and the vLLM output conversion (no vLLM, no GPU needed), and the API response cache."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from pbkd_cli.config.schema import GenerationBackend, ModelConfig
from pbkd_cli.generation import vllm_backend
from pbkd_cli.generation.openai_api import ChatEndpoint
from pbkd_cli.io import PbkdError
from tests.chat_server import chat_server


class Tokenizer:
    def batch_decode(self, rows, skip_special_tokens):
        return [" ".join(str(t) for t in row if t != 2) for row in rows]


def test_vllm_outputs_become_samples_with_the_stop_token_kept():
    outputs = [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[5, 6], finish_reason="stop"),
                                        SimpleNamespace(token_ids=[7, 8, 9], finish_reason="length")]),
               SimpleNamespace(outputs=[SimpleNamespace(token_ids=[4, 2], finish_reason="stop"),
                                        SimpleNamespace(token_ids=[], finish_reason="stop")])]
    samples = vllm_backend.samples_from_outputs(outputs, [[1], [1, 3]], 2, eos=2, tokenizer=Tokenizer())
    assert samples.response_ids == [[5, 6, 2], [7, 8, 9], [4, 2], [2]]
    assert samples.finished == [True, False, True, True]
    assert samples.prompt_ids == [[1], [1], [1, 3], [1, 3]] and samples.texts[0] == "5 6"


@pytest.mark.parametrize("installed", [False, True])
def test_auto_uses_vllm_only_when_installed_with_a_gpu_and_a_model_directory(monkeypatch, installed):
    monkeypatch.setattr(vllm_backend.importlib.util, "find_spec", lambda name: object() if installed else None)
    monkeypatch.setattr(vllm_backend.torch.cuda, "is_available", lambda: installed)
    on_disk, tiny = ModelConfig(name_or_path="/models/teacher"), ModelConfig()
    assert vllm_backend.use_vllm(GenerationBackend.auto, on_disk, "model.teacher") is installed
    assert vllm_backend.use_vllm(GenerationBackend.auto, tiny, "model.teacher") is False
    assert vllm_backend.use_vllm(GenerationBackend.hf, on_disk, "model.teacher") is False
    if installed:
        assert vllm_backend.use_vllm(GenerationBackend.vllm, on_disk, "model.teacher") is True
        with pytest.raises(PbkdError, match="model.teacher has no name_or_path"):
            vllm_backend.use_vllm(GenerationBackend.vllm, tiny, "model.teacher")
    else:
        with pytest.raises(PbkdError, match=r"generation.backend=vllm: needs vLLM installed"):
            vllm_backend.use_vllm(GenerationBackend.vllm, on_disk, "model.teacher")


def test_api_responses_are_cached_by_request_and_never_store_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("PBKD_TEST_KEY", "secret-key")
    calls = []

    def reply(body, headers):
        calls.append(body)
        return [f"answer {len(calls)}"] * body["n"]

    with chat_server(reply) as url:
        api = ChatEndpoint(base_url=url, model="m", api_key_env="PBKD_TEST_KEY", cache_dir=str(tmp_path))
        chat = [{"role": "user", "content": "2 + 2?"}]
        first = api.complete(chat, temperature=1.0, n=2)
        assert api.complete(chat, temperature=1.0, n=2) == first == ["answer 1", "answer 1"]
        assert len(calls) == 1
        api.complete(chat, temperature=0.5, n=2)  # other sampling settings: another request
        ChatEndpoint(base_url=url, model="other", cache_dir=str(tmp_path)).complete(chat, n=2)
        assert len(calls) == 3
    files = list(tmp_path.rglob("*.json"))
    assert len(files) == 3 and all("secret-key" not in f.read_text() for f in files)
    assert json.loads(files[0].read_text())["texts"]


def test_samples_groups_keep_whole_prompt_groups_in_the_given_order():
    from pbkd_cli.generation.hf import Samples
    samples = Samples(prompt_ids=[[1], [1], [2], [2], [3], [3]], response_ids=[[10], [11], [20], [21], [30], [31]],
                      texts=["a", "b", "c", "d", "e", "f"], finished=[True, False, True, True, False, True],
                      num_samples=2)
    kept = samples.groups([2, 0])
    assert kept.prompt_ids == [[3], [3], [1], [1]] and kept.response_ids == [[30], [31], [10], [11]]
    assert kept.texts == ["e", "f", "a", "b"] and kept.finished == [False, True, True, False]
    assert kept.num_samples == 2


def test_hugging_face_generation_progress_counts_prompts_as_their_batch_finishes():
    from pbkd_cli.generation import generate
    from tests.unit.tiny import tiny_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_lm(tokenizer, hidden=16)
    seen: list[tuple[int, int]] = []  # (total the bar was given, prompts counted so far)

    def progress(iterable, total):
        for n, item in enumerate(iterable, 1):
            seen.append((total, n))
            yield item

    prompts = [tokenizer("1 + 2 =")["input_ids"]] * 5
    samples = generate(model, tokenizer, prompts, num_samples=2, temperature=1.0, max_new_tokens=3, batch_size=4,
                       progress=progress)
    assert len(samples.texts) == 10
    assert seen == [(5, n) for n in range(1, 6)]  # 5 prompts in 3 batches of 2, 2 and 1


def test_a_long_batch_logs_its_decoding_step_and_generates_as_without(monkeypatch, caplog):
    import logging

    import torch

    from pbkd_cli.generation import generate, hf
    from tests.unit.tiny import tiny_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_lm(tokenizer, hidden=16)
    prompts = [tokenizer("1 + 2 =")["input_ids"]] * 3
    torch.manual_seed(0)
    quiet = generate(model, tokenizer, prompts, temperature=1.0, max_new_tokens=4, batch_size=8)
    monkeypatch.setattr(hf, "BATCH_HEARTBEAT_S", 0.0)  # every decoding step is "long"
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="pbkd"):
        logged = generate(model, tokenizer, prompts, temperature=1.0, max_new_tokens=4, batch_size=8)
    assert logged.response_ids == quiet.response_ids
    beats = [r.getMessage() for r in caplog.records if r.getMessage().startswith("generate: batch")]
    assert beats and beats[0].startswith("generate: batch 1/1, token 1/4")
