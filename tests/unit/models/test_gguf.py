"""A real GGUF file through pbkd's loaders (needs the `gguf` extra; skipped without it): a model read from
it trains and saves as plain safetensors, which transformers refuses for the quantizer it attaches."""

import json

import numpy as np
import pytest
import torch

from pbkd_cli.config.schema import ModelConfig, RewardPooling
from pbkd_cli.engine import save_model
from pbkd_cli.models import build_bpe_tokenizer, load_causal_lm
from pbkd_cli.models.reward import load_reward_model

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")


def write_tiny_qwen2(path, tokenizer, hidden=32, ffn=64):
    """One Qwen2 layer, its matrices in Q8_0 blocks, the tokenizer as a GGUF's byte-level BPE."""
    from gguf.quants import quantize

    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(state["vocab"].items(), key=lambda kv: kv[1])]
    writer = gguf.GGUFWriter(str(path), "qwen2")
    metadata = {"context_length": 128, "embedding_length": hidden, "block_count": 1, "feed_forward_length": ffn,
                "head_count": 2, "head_count_kv": 2, "layer_norm_rms_eps": 1e-6, "rope_freq_base": 10000.0,
                "tokenizer_model": "gpt2", "tokenizer_pre": "qwen2", "token_list": tokens,
                "token_types": [1] * len(tokens),
                "token_merges": [m if isinstance(m, str) else " ".join(m) for m in state["merges"]],
                "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    for name, value in metadata.items():
        getattr(writer, f"add_{name}")(value)
    rng = np.random.default_rng(0)

    def matrix(name, rows, cols):
        blocks = quantize((rng.standard_normal((rows, cols)) * 0.05).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    matrix("token_embd.weight", len(tokens), hidden)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        writer.add_tensor(name, np.ones(hidden, np.float32))
    for part in "qkv":
        matrix(f"blk.0.attn_{part}.weight", hidden, hidden)
        writer.add_tensor(f"blk.0.attn_{part}.bias", np.zeros(hidden, np.float32))
    matrix("blk.0.attn_output.weight", hidden, hidden)
    matrix("blk.0.ffn_gate.weight", ffn, hidden)
    matrix("blk.0.ffn_up.weight", ffn, hidden)
    matrix("blk.0.ffn_down.weight", hidden, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("role", ["student", "rm"])
def test_a_model_read_from_a_real_gguf_file_saves_as_plain_safetensors(tmp_path, role):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    tokenizer = build_bpe_tokenizer(["Question: 3 + 2?\nAnswer: 3 + 2 = 5. #### 5"] * 10, vocab_size=280)
    write_tiny_qwen2(tmp_path / "tiny-q8_0.gguf", tokenizer)
    cfg = ModelConfig(name_or_path=str(tmp_path), gguf_file="tiny-q8_0.gguf")
    if role == "student":
        model, auto = load_causal_lm(cfg, tokenizer, "model.student"), AutoModelForCausalLM
    else:
        model, auto = load_reward_model(cfg, tokenizer, RewardPooling.last), AutoModelForSequenceClassification
    assert getattr(model, "hf_quantizer", None) is None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # as a training step would
    save_model(model, tokenizer, tmp_path / "model")
    reloaded = auto.from_pretrained(tmp_path / "model", use_safetensors=True)
    assert "quantization_config" not in (tmp_path / "model" / "config.json").read_text()
    trained = model.state_dict()
    assert all(torch.equal(value, trained[name]) for name, value in reloaded.state_dict().items())
