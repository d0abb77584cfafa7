"""Loading a model or tokenizer from a path that holds none: one line naming the key, no traceback."""

import pytest
import torch

from pbkd_cli.config.schema import ModelConfig, TokenizerConfig
from pbkd_cli.io import PbkdError
from pbkd_cli.models.factory import load_causal_lm, load_tokenizer


def test_a_path_that_is_missing_a_file_or_not_a_model_is_one_line(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not a model")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(tmp_path / "missing", "no such file or directory"), (weights, "a file, not a model directory"),
             (empty, "no tokenizer there")]
    for path, reason in cases:
        with pytest.raises(PbkdError) as err:
            load_tokenizer(ModelConfig(name_or_path=str(path)), "model.student", TokenizerConfig(), lambda: [])
        assert str(err.value).startswith(f"model.student.name_or_path={path}: {reason}")
        assert "\n" not in str(err.value)
    with pytest.raises(PbkdError, match=rf"^model.teacher.name_or_path={empty}: "):
        load_causal_lm(ModelConfig(name_or_path=str(empty)), None, "model.teacher")


@pytest.mark.parametrize("missing", ["gguf", "accelerate"])
def test_a_gguf_file_without_its_packages_is_one_line_naming_the_extra(tmp_path, monkeypatch, missing):
    import sys
    import types

    from pbkd_cli.config.schema import RewardPooling
    from pbkd_cli.models.factory import GGUF_PACKAGES
    from pbkd_cli.models.reward import load_reward_model

    # `import <missing>` raises ImportError and the other package imports, whatever this venv holds.
    for package in GGUF_PACKAGES:
        monkeypatch.setitem(sys.modules, package, None if package == missing else types.ModuleType(package))
    cfg = ModelConfig(name_or_path=str(tmp_path), gguf_file="qwen2.5-0.5b-q8_0.gguf")
    expected = (f"model.student.gguf_file=qwen2.5-0.5b-q8_0.gguf: reading GGUF needs the '{missing}' package: "
                "pip install 'pbkd-cli[gguf]'")
    loads = [lambda: load_tokenizer(cfg, "model.student", TokenizerConfig(), lambda: []),
             lambda: load_causal_lm(cfg, None, "model.student"),
             lambda: load_reward_model(cfg, None, RewardPooling.last, key="model.student")]
    for load in loads:
        with pytest.raises(PbkdError) as err:
            load()
        assert str(err.value) == expected


GGUF = "tiny-q8_0.gguf"


def tiny_llama():
    from pbkd_cli.config.schema import TinyLlamaConfig
    from pbkd_cli.models import build_bpe_tokenizer
    from pbkd_cli.models.factory import _tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = build_bpe_tokenizer(["Question: 3 + 2?\nAnswer: 3 + 2 = 5. #### 5"] * 10, vocab_size=280)
    arch = TinyLlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                           intermediate_size=32)
    return tokenizer, LlamaForCausalLM(_tiny_llama_config(ModelConfig(tiny=arch), tokenizer, "model.student"))


def gguf_loaded(model):
    """`model` as transformers 5 leaves one it read from a GGUF file through its legacy loader (Llama,
    Qwen2, ...): the weights unpacked into ordinary tensors, its GGUF quantizer still attached."""
    quantizer_gguf = pytest.importorskip("transformers.quantizers.quantizer_gguf")
    from transformers.utils.quantization_config import GgufConfig

    quantizer = quantizer_gguf.GgufHfQuantizer(GgufConfig(gguf_file=GGUF))
    model.hf_quantizer, model.is_quantized = quantizer, True
    model.quantization_method = quantizer.quantization_config.quant_method
    model.config.quantization_config = quantizer.quantization_config
    model.config._is_quantized = True
    return model


def load_from_gguf(monkeypatch, tmp_path, model, tokenizer):
    """`load_causal_lm` of a `gguf_file` whose `from_pretrained` returns `model`; its keyword arguments."""
    import pbkd_cli.models.factory as factory
    from transformers import AutoModelForCausalLM

    calls = []

    def from_pretrained(name_or_path, **kwargs):
        calls.append(kwargs)
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(factory, "require_gguf_packages", lambda cfg, key: None)
    loaded = load_causal_lm(ModelConfig(name_or_path=str(tmp_path), gguf_file=GGUF), tokenizer, "model.student")
    return loaded, calls[0]


def test_a_model_loaded_from_gguf_trains_and_saves_as_plain_safetensors(tmp_path, monkeypatch):
    import copy

    from pbkd_cli.config.schema import LrSchedule, TrainerConfig
    from pbkd_cli.data.prompts import collate
    from pbkd_cli.engine import build_engine, save_model
    from pbkd_cli.objectives.language_modeling import response_nll_loss
    from transformers import LlamaForCausalLM

    tokenizer, fresh = tiny_llama()
    with pytest.raises(ValueError, match="quantized with gguf and is not serializable"):
        gguf_loaded(copy.deepcopy(fresh)).save_pretrained(tmp_path / "as_transformers_leaves_it")
    model, kwargs = load_from_gguf(monkeypatch, tmp_path, gguf_loaded(copy.deepcopy(fresh)), tokenizer)
    # Unpacked at load, where transformers can (`kernels` installed would leave the blocks packed).
    assert kwargs["gguf_file"] == GGUF and kwargs["quantization_config"].dequantize is True
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")

    trainer = TrainerConfig(lr=1e-2, warmup_ratio=0.0, lr_schedule=LrSchedule.constant, micro_batch_size=2, max_steps=1)
    engine = build_engine(model, trainer, {"zero_optimization": {"stage": 0}})
    batch = collate([[5, 6], [7]], [[8, 9, 1], [10, 1]], tokenizer.pad_token_id)
    logits = engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    engine.backward(response_nll_loss(logits, batch.input_ids, batch.response_mask)[0])
    engine.step()
    save_model(engine, tokenizer, tmp_path / "model")
    assert "quantization_config" not in (tmp_path / "model" / "config.json").read_text()
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "model", use_safetensors=True)
    trained = engine.module.state_dict()
    assert not torch.equal(trained["model.norm.weight"], fresh.state_dict()["model.norm.weight"])
    assert all(torch.equal(value, trained[name]) for name, value in reloaded.state_dict().items())


def test_gguf_weights_left_packed_or_an_unsaveable_quantizer_stop_before_any_training(tmp_path, monkeypatch):
    from pbkd_cli.config.schema import TrainerConfig
    from pbkd_cli.engine import build_engine

    tokenizer, model = tiny_llama()
    # A GgufLinear keeps its blocks as a frozen uint8 weight.
    model.model.layers[0].mlp.down_proj.weight = torch.nn.Parameter(torch.zeros(16, 34, dtype=torch.uint8),
                                                                     requires_grad=False)
    with pytest.raises(PbkdError) as err:
        load_from_gguf(monkeypatch, tmp_path, gguf_loaded(model), tokenizer)
    assert str(err.value) == (f"model.student.gguf_file={GGUF}: model.layers.0.mlp.down_proj.weight stayed packed "
                              "in GGUF blocks, which cannot be trained or saved (convert the file to safetensors "
                              "and load that)")
    _, quantized = tiny_llama()
    quantized.config.name_or_path = "org/model-gguf"
    with pytest.raises(PbkdError, match=r"^org/model-gguf: quantized with gguf, which transformers cannot save "
                                        r"after training; train an unquantized \(safetensors\) checkpoint$"):
        build_engine(gguf_loaded(quantized), TrainerConfig(), {"zero_optimization": {"stage": 0}})


def test_keeping_every_other_decoder_layer_is_that_stack_of_the_pretrained_layers(tmp_path):
    from transformers import AutoModelForCausalLM

    from pbkd_cli.engine import save_model
    from pbkd_cli.models.factory import keep_decoder_layers
    from tests.unit.tiny import tiny_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    full = tiny_lm(tokenizer, layers=4).eval()
    reference = tiny_lm(tokenizer, layers=2).eval()  # the same model built with layers 0 and 2 of `full`
    reference.load_state_dict({**full.state_dict(), **{
        f"model.layers.{new}.{name}": value for new, old in ((0, 0), (1, 2))
        for name, value in full.model.layers[old].state_dict().items()}}, strict=False)
    ids = torch.tensor([tokenizer.encode("12 + 30 = 42")])
    student = keep_decoder_layers(full, [0, 2], "pipeline.student_layers")
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    torch.testing.assert_close(student(ids).logits, reference(ids).logits, rtol=0, atol=0)
    # The KV cache is indexed by the new positions: cached greedy decoding equals uncached.
    cached = student.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = student.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
    save_model(student, tokenizer, tmp_path / "student")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert reloaded.config.num_hidden_layers == 2
    torch.testing.assert_close(reloaded(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("keep", [[], [2, 0], [0, 0], [4], [-1]])
def test_layer_indices_that_are_not_an_increasing_subset_are_one_line(keep):
    from pbkd_cli.models.factory import keep_decoder_layers
    from tests.unit.tiny import tiny_lm, tiny_tokenizer

    with pytest.raises(PbkdError, match=r"^pipeline.student_layers: .*increasing, distinct layer indices in 0..3$"):
        keep_decoder_layers(tiny_lm(tiny_tokenizer(), layers=4), keep, "pipeline.student_layers")
