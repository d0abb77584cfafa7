"""The only place that knows about DeepSpeed and torch.distributed (see DESIGN.md)."""

from pbkd_cli.engine.distributed import (DistributedContext, distributed_context, gather, init_process_group,
                                         reduce_metrics, seed_everything, shard)
from pbkd_cli.engine.deepspeed_engine import (build_engine, build_frozen_engine, inference_device,
                                               save_model)

__all__ = ["DistributedContext", "build_engine", "build_frozen_engine", "distributed_context", "gather",
           "inference_device", "init_process_group", "reduce_metrics", "save_model", "seed_everything", "shard"]
