"""DeepSpeed engines for the models a stage trains, and saving what they hold.

The same path serves one CPU process (gloo) and multi-GPU jobs (nccl). Without an `optimizer`
section in the DeepSpeed config, a torch AdamW is handed to DeepSpeed, which compiles nothing;
with one (e.g. `deepspeed=zero3_offload`), DeepSpeed builds its own (compiled) optimiser.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from functools import partial
from pathlib import Path
from typing import Any

import torch

from pbkd_cli.config.schema import TrainerConfig
from pbkd_cli.engine.distributed import distributed_context
from pbkd_cli.io import PbkdError
from pbkd_cli.models.factory import bf16_supported

log = logging.getLogger("pbkd")


def _deepspeed():
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    if not torch.cuda.is_available() and os.environ.get("PBKD_DS_SHM_COMM") != "1":
        # The shm collective is JIT-compiled with gcc on first use; gloo needs no build step.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if distributed_context().world_size == 1:  # also fills in the launcher variables DeepSpeed reads
            # One process: an in-memory store instead of a TCP rendezvous, so no port is opened and two
            # runs started at once cannot collide on one.
            torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
        else:
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return deepspeed


def inference_device() -> torch.device:
    ctx = distributed_context()
    return torch.device("cuda", ctx.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def resolve_precision(ds: dict[str, Any]) -> dict[str, Any]:
    """`ds` with `bf16.enabled: auto` made true where `bf16_supported()`, false elsewhere."""
    if str(ds.get("bf16", {}).get("enabled")).lower() != "auto":
        return ds
    return {**ds, "bf16": {**ds["bf16"], "enabled": bf16_supported()}}


def deepspeed_config(ds: dict[str, Any], trainer: TrainerConfig, world_size: int | None = None) -> dict[str, Any]:
    """The user's DeepSpeed section completed with the batch arithmetic and clipping of `trainer`.

    The batch sizes have one source, `trainer`: global = micro x accumulation x world size.
    """
    world = world_size or distributed_context().world_size
    global_batch = trainer.micro_batch_size * trainer.grad_accum * world
    if trainer.global_batch_size is not None and trainer.global_batch_size != global_batch:
        raise PbkdError(f"trainer.global_batch_size={trainer.global_batch_size}: micro_batch_size "
                        f"{trainer.micro_batch_size} x grad_accum {trainer.grad_accum} x {world} ranks = {global_batch}")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in ds:
            raise PbkdError(f"deepspeed.{key}: set the batch through trainer.micro_batch_size / trainer.grad_accum")
    ds = resolve_precision(ds)
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        raise PbkdError("deepspeed.fp16.enabled: bf16 and fp16 cannot both be enabled")
    config = copy.deepcopy(dict(ds))
    config.update(
        train_micro_batch_size_per_gpu=trainer.micro_batch_size,
        gradient_accumulation_steps=trainer.grad_accum,
        train_batch_size=global_batch,
        gradient_clipping=trainer.max_grad_norm,
    )
    config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("steps_per_print", 10**9)
    return config


def lr_multiplier(step: int, schedule: str, warmup: int, total: int) -> float:
    """The factor on the peak lr for optimiser step `step` (0-based): a linear warm-up over `warmup`
    steps, then constant, cosine or linear decay to 0 at `total`.

    The warm-up is `(step + 1) / (warmup + 1)`, so the first update already moves the weights:
    transformers' schedulers start at exactly 0, which wastes the first step, and in a short game
    (a few dozen updates) that is a visible part of the budget.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown lr schedule {schedule!r}")


def require_saveable(model: torch.nn.Module) -> None:
    """Refuse, before the first step, a model that `save_model` would refuse after the last one: one
    whose transformers quantizer cannot be serialised (a quantized hub checkpoint; a GGUF load that
    `models.factory.unquantized` could not make plain is refused at load already)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    serializable = quantizer.is_serializable  # a method in transformers 5, a property in some 4.x quantizers
    if not (serializable() if callable(serializable) else serializable):
        method = quantizer.quantization_config.quant_method
        raise PbkdError(f"{model.config.name_or_path}: quantized with {getattr(method, 'value', method)}, which "
                        f"transformers cannot save after training; train an unquantized (safetensors) checkpoint")


def build_engine(model: torch.nn.Module, trainer: TrainerConfig, ds: dict[str, Any]):
    """Wrap `model` in a DeepSpeed engine with AdamW and the schedule of `trainer`.

    The engine's `backward` scales for gradient accumulation and its `step` only updates on
    accumulation boundaries, so loops call both once per micro-batch.
    """
    require_saveable(model)
    config = deepspeed_config(ds, trainer)
    deepspeed = _deepspeed()
    if trainer.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # A training forward has no use for a KV cache (building one costs a copy per layer, and backward
    # runs through it); `generation.hf.generate` asks for the cache explicitly.
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    if "optimizer" in config:  # DeepSpeed's own optimiser (CPU offload), with the trainer's settings
        config["optimizer"]["params"] = {**config["optimizer"].get("params", {}), "lr": trainer.lr,
                                         "betas": list(trainer.adam_betas), "weight_decay": trainer.weight_decay}
    else:
        # fused: one kernel over all parameters (CPU and CUDA); the default is a Python loop over them.
        optimizer = torch.optim.AdamW(params, lr=trainer.lr, betas=tuple(trainer.adam_betas),
                                      weight_decay=trainer.weight_decay, fused=True)
    warmup = int(trainer.warmup_ratio * trainer.max_steps)

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(
            opt, partial(lr_multiplier, schedule=trainer.lr_schedule.value, warmup=warmup,
                         total=trainer.max_steps))

    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                      lr_scheduler=schedule, config=config)
    if distributed_context().world_size == 1 and config.get("zero_optimization", {}).get("stage", 0) == 0:
        # One rank without ZeRO: the gradient all-reduce would only flatten, copy and divide by 1.
        engine.enable_backward_allreduce = False
    return engine


def build_frozen_engine(model: torch.nn.Module, ds: dict[str, Any]):
    """A model that only runs forward passes (the teacher of white-box KD, a reference policy).

    Under ZeRO-3 it is partitioned across ranks like the trained models, so a teacher larger than
    one device still fits; otherwise it is simply moved to this rank's device.
    """
    model.eval().requires_grad_(False)
    model.config.use_cache = False  # forward passes only; `generate` asks for its cache explicitly
    ds = resolve_precision(ds)
    zero = dict(ds.get("zero_optimization", {}))
    if zero.get("stage", 0) != 3:
        return model.to(inference_device())
    deepspeed = _deepspeed()
    zero.pop("offload_optimizer", None)  # nothing to optimise
    config = {"zero_optimization": zero, "train_micro_batch_size_per_gpu": 1,
              "steps_per_print": 10**9, **{k: ds[k] for k in ("bf16", "fp16") if k in ds}}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def save_model(engine_or_model, tokenizer, path: str | Path) -> None:
    """`save_pretrained` (safetensors) of an engine's module, gathering ZeRO-3 shards first. A LoRA
    (PEFT) model is saved merged into its base, a plain checkpoint, with its adapters in `adapter/`."""
    from pbkd_cli.io import atomic_directory

    module = getattr(engine_or_model, "module", engine_or_model)
    if hasattr(module, "merge_and_unload"):  # PEFT; ZeRO-3 is refused for LoRA by the schema
        if not distributed_context().is_main:
            return
        with atomic_directory(path) as tmp:
            module.save_pretrained(tmp / "adapter")
            merged = copy.deepcopy(module).merge_and_unload()
            merged.config.use_cache = True
            merged.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        return
    state_dict = None
    if getattr(engine_or_model, "zero_optimization_partition_weights", lambda: False)():
        state_dict = engine_or_model._zero3_consolidated_16bit_state_dict()
    if not distributed_context().is_main:
        return
    with atomic_directory(path) as tmp:
        use_cache, module.config.use_cache = module.config.use_cache, True  # the saved model generates as usual
        module.save_pretrained(tmp, state_dict=state_dict)
        module.config.use_cache = use_cache
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
