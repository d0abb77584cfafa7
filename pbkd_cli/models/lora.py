"""LoRA (PEFT) for the models a stage trains: `model.<role>.lora.r` > 0 freezes the base weights and
trains low-rank adapters on its linear layers (and a scalar RM's value head); `engine.save_model` then
writes the merged model, which every other tool loads as a plain checkpoint, and the adapters apart."""

from __future__ import annotations

import logging

import torch

from pbkd_cli.config.schema import LoraConfig
from pbkd_cli.io import PbkdError

log = logging.getLogger("pbkd")


def with_lora(model, lora: LoraConfig, key: str):
    """`model` with fresh LoRA adapters when `lora.r` > 0, else `model` itself."""
    if not lora.r:
        return model
    try:
        import peft
    except ImportError:
        raise PbkdError(f"{key}.lora.r={lora.r}: LoRA needs the 'peft' package: pip install 'pbkd-cli[lora]'") from None
    classifier = type(model).__name__.endswith("ForSequenceClassification")
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules) if lora.target_modules else "all-linear",
                             # A sequence classifier's value head is new: it trains whole (modules_to_save).
                             task_type=peft.TaskType.SEQ_CLS if classifier else peft.TaskType.CAUSAL_LM)
    try:
        model = peft.get_peft_model(model, config)
    except ValueError as exc:  # e.g. target_modules that match nothing
        raise PbkdError(f"{key}.lora: {str(exc).splitlines()[0]}") from None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("%s: LoRA r=%d, %.2fM of %.2fM parameters trainable (%.2f%%)", key, lora.r, trainable / 1e6,
             total / 1e6, 100 * trainable / total)
    return model


def is_lora(model) -> bool:
    return hasattr(getattr(model, "module", model), "disable_adapter")


def unwrapped(model):
    """The transformers model under a PEFT wrapper (its adapters stay in its layers), else `model`."""
    module = getattr(model, "module", model)
    return module.get_base_model() if is_lora(module) else module


class AdapterDisabled:
    """A LoRA model as it started (its base, adapters off), run without gradients in eval mode: the
    frozen reference of a KL penalty or DPO, with no second copy of the weights."""

    def __init__(self, model):
        self.model = getattr(model, "module", model)

    @torch.no_grad()
    def __call__(self, **inputs):
        training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                return self.model(**inputs)
        finally:
            self.model.train(training)
