"""Models from the hub or a local directory, or tiny Llamas built from a config with no hub at all.

Weights are only read from safetensors (or GGUF when `gguf_file` is set), and remote code runs only
when the model's config sets `trust_remote_code: true`.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Callable

import torch

from pbkd_cli.config.schema import Dtype, ModelConfig, TokenizerConfig
from pbkd_cli.io import PbkdError

log = logging.getLogger("pbkd")

PAD, EOS = "<pad>", "</s>"
# What reading a GGUF file takes beyond pbkd's own dependencies (the `gguf` extra): transformers parses
# the file with `gguf` and, for the model, will not start without `accelerate`.
GGUF_PACKAGES = ("gguf", "accelerate")


def build_bpe_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained on `texts` (GPT-2 style pre-tokenization, no normalisation)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)


def _check_local(name_or_path: str, key: str) -> None:
    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()
    if looks_local and not Path(name_or_path).expanduser().exists():
        raise PbkdError(f"{key}.name_or_path={name_or_path}: no such file or directory")
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        raise PbkdError(f"{key}.name_or_path={name_or_path}: a file, not a model directory "
                        f"(a GGUF file goes in {key}.gguf_file, its directory in name_or_path)")


def require_gguf_packages(cfg: ModelConfig, key: str) -> None:
    """A GGUF model without its packages stops here in one line naming the extra, rather than in
    transformers (a traceback from the tokenizer, or a ValueError halfway through loading the model)."""
    for package in GGUF_PACKAGES:
        try:
            importlib.import_module(package)
        except ImportError:
            raise PbkdError(f"{key}.gguf_file={cfg.gguf_file}: reading GGUF needs the '{package}' package: "
                            f"pip install 'pbkd-cli[gguf]'") from None


def load_tokenizer(cfg: ModelConfig, key: str, tokenizer_cfg: TokenizerConfig,
                   corpus: Callable[[], list[str]]):
    """The model's own tokenizer, or for a from-scratch model one trained on the task's `corpus`."""
    if cfg.name_or_path is None:
        tokenizer = build_bpe_tokenizer(corpus(), tokenizer_cfg.vocab_size)
    else:
        from transformers import AutoTokenizer

        _check_local(cfg.name_or_path, key)
        if cfg.gguf_file:
            require_gguf_packages(cfg, key)
        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path, revision=cfg.revision,
                                                      gguf_file=cfg.gguf_file,
                                                      trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise PbkdError(f"{key}.name_or_path={cfg.name_or_path}: no tokenizer there "
                            f"({str(exc).splitlines()[0][:200]})") from None
    if tokenizer.eos_token is None:
        raise PbkdError(f"{key}: the tokenizer has no eos token; generation could not stop")
    if tokenizer.pad_token is None:
        # Padding is always masked out, so reusing eos as pad is safe.
        log.warning("%s: tokenizer has no pad token; using eos (%r) as pad", key, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tiny_llama_config(cfg: ModelConfig, tokenizer, key: str):
    from transformers import LlamaConfig

    if cfg.tiny is None:
        raise PbkdError(f"{key}: set either name_or_path (a hub id or directory) or tiny (an architecture)")
    arch = cfg.tiny
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )


def _dequantizing_gguf() -> dict:
    """Ask transformers to unpack GGUF blocks into plain tensors at load: pbkd trains and saves dense
    weights, and blocks that stay packed (where a GGUF matmul kernel is installed) are frozen uint8."""
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers 4 always unpacks GGUF and attaches no quantizer
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def bf16_supported() -> bool:
    """Whether this process computes in bfloat16 at speed: a CUDA device that supports it. A CPU runs
    bf16 matmuls far slower than float32 (a 0.5B model's eval stalled for minutes)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def torch_dtype(dtype: Dtype) -> torch.dtype:
    """The weights' dtype; `auto`: bfloat16 where `bf16_supported()`, else float32."""
    if dtype == Dtype.auto:
        return torch.bfloat16 if bf16_supported() else torch.float32
    return getattr(torch, dtype.value)


def _pretrained_kwargs(cfg: ModelConfig, key: str) -> dict:
    kwargs = dict(revision=cfg.revision, dtype=torch_dtype(cfg.dtype),
                  trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.gguf_file:
        require_gguf_packages(cfg, key)
        kwargs.update(gguf_file=cfg.gguf_file, **_dequantizing_gguf())
    else:
        kwargs["use_safetensors"] = True
    return kwargs


def unquantized(model, cfg: ModelConfig, key: str):
    """A model loaded from `cfg.gguf_file` made an ordinary one, which `save_pretrained` writes as safetensors.

    transformers 5 attaches a GGUF quantizer to every model it reads from GGUF. Unless asked to
    dequantize (as `_pretrained_kwargs` does), its legacy loader (Llama, Qwen2 and most architectures)
    unpacks the weights into plain tensors and leaves that quantizer attached, and `save_pretrained` then
    refuses the model ("quantized with gguf and is not serializable") after all of the training. A
    quantizer still attached here (a version that ignores the request) is dropped as transformers drops
    it after a dequantizing load (`HfQuantizer.remove_quantization_config`). Weights still in blocks can
    be neither trained nor saved: refused here, at load, before any training.
    """
    from transformers import PreTrainedModel

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return model
    packed = next((name for name, p in model.named_parameters() if not p.is_floating_point()), None)
    if packed is not None:
        raise PbkdError(f"{key}.gguf_file={cfg.gguf_file}: {packed} stayed packed in GGUF blocks, which cannot be "
                        f"trained or saved (convert the file to safetensors and load that)")
    quantizer.remove_quantization_config(model)
    for module in model.modules():  # flags it set on every sub-model's config (attention picks dtypes by it)
        if isinstance(module, PreTrainedModel) and hasattr(module.config, "_is_quantized"):
            del module.config._is_quantized
    return model


def from_pretrained(auto, cfg: ModelConfig, key: str, **head):
    """`auto.from_pretrained(cfg.name_or_path)` (an Auto class), a plain model even from a GGUF file; a
    failure is one line naming the key."""
    try:
        model = auto.from_pretrained(cfg.name_or_path, **head, **_pretrained_kwargs(cfg, key))
    except (OSError, ValueError) as exc:
        raise PbkdError(f"{key}.name_or_path={cfg.name_or_path}: {str(exc).splitlines()[0]}") from None
    return unquantized(model, cfg, key) if cfg.gguf_file else model


def load_causal_lm(cfg: ModelConfig, tokenizer, key: str):
    """A causal LM: `from_pretrained(name_or_path)`, or a freshly initialised tiny Llama."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if cfg.name_or_path is None:
        model = LlamaForCausalLM(_tiny_llama_config(cfg, tokenizer, key))
    else:
        _check_local(cfg.name_or_path, key)
        model = from_pretrained(AutoModelForCausalLM, cfg, key)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def parameter_count(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def keep_decoder_layers(model, keep: list[int], key: str):
    """`model` with only the decoder layers `keep` (in order), as DistilBERT initialised its student from
    every other layer of BERT: the embeddings, final norm and LM head are the pretrained ones, and the
    config says the new depth, so the saved model reloads as it is in plain transformers."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise PbkdError(f"{key}: cannot find the decoder layers of {type(model).__name__} (a `layers` list under "
                        f"get_decoder()) to keep {keep}")
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= len(layers):
        raise PbkdError(f"{key}: {keep}: increasing, distinct layer indices in 0..{len(layers) - 1}")
    decoder.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for index, layer in enumerate(decoder.layers):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = index  # the KV cache is indexed by position in the new stack
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.config.num_hidden_layers = len(keep)
    return model
