"""Process-group set-up and collectives that work the same for 1 CPU process and N GPU ranks.

With one process every helper here is the identity and touches no process group, so the CPU demo
and the unit tests never need `torch.distributed`.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

import numpy as np
import torch

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _from_slurm() -> bool:
    """Ranks from SLURM's task variables: `srun` or submitit started one process per task (no torchrun).

    The rendezvous host is the first of the job's nodes (submitit and our sbatch templates export it
    as MASTER_ADDR; a single node falls back to localhost).
    """
    tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if tasks <= 1 or "SLURM_PROCID" not in os.environ:
        return False
    os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=str(tasks),
                      LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    # Every task derives the same port from the job id.
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
    return True


@lru_cache(maxsize=1)
def distributed_context() -> DistributedContext:
    """Read the launcher's rank variables; a plain `pbkd` call becomes rank 0 of a world of 1.

    DeepSpeed wants RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT even for one process
    (otherwise it goes looking for MPI), so they are filled in here when no launcher set them.
    """
    if "RANK" not in os.environ and not _from_slurm():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    return DistributedContext(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def init_process_group() -> None:
    """Join the launcher's process group (several ranks only); DeepSpeed later reuses it."""
    ctx = distributed_context()
    if ctx.world_size == 1 or torch.distributed.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(ctx.local_rank)
    torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _multi_process() -> bool:
    return distributed_context().world_size > 1 and torch.distributed.is_initialized()


def _collective_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU ones.
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The mean over ranks of each number in `metrics` (throughputs, `*per_second`, are summed).

    Every rank must call it with the same keys in the same order, which the stage loops do.
    """
    if not _multi_process():
        return metrics
    keys = [k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not keys:
        return metrics
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(values)
    world = distributed_context().world_size
    reduced = dict(metrics)
    for key, total in zip(keys, values.tolist()):
        reduced[key] = total if key.endswith("per_second") else total / world
    return reduced


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (a pre-emption signal, a non-finite loss)."""
    if not _multi_process():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def barrier() -> None:
    if _multi_process():
        torch.distributed.barrier()


def shard(items: list[T]) -> list[T]:
    """This rank's share of `items` (every world_size-th, from its rank); `gather` undoes it."""
    ctx = distributed_context()
    return items[ctx.rank::ctx.world_size]


def gather(local: list[T], total: int) -> list[T]:
    """The shards of all ranks put back in the original order of `total` items, on every rank."""
    if not _multi_process():
        return local
    world = distributed_context().world_size
    parts: list[list[T]] = [[] for _ in range(world)]
    torch.distributed.all_gather_object(parts, local)
    return [parts[i % world][i // world] for i in range(total)]
