"""The only place that knows about DeepSpeed and torch.distributed (see DESIGN.md)."""

from pbkd_cli.engine.distributed import DistributedContext, distributed_context, seed_everything
from pbkd_cli.engine.deepspeed_engine import (build_engine, build_frozen_engine, inference_device,
                                               save_model)

__all__ = ["DistributedContext", "build_engine", "build_frozen_engine", "distributed_context", "inference_device",
           "save_model", "seed_everything"]
