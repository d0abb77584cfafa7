"""Endless shuffled minibatches of example indices, resumable."""

from __future__ import annotations

from typing import Iterator

import torch

from pbkd_cli.engine import distributed_context
from pbkd_cli.io import PbkdError


class Minibatches:
    """Endless shuffled index batches, one fresh permutation per epoch; each rank gets its share.

    Its position (`state_dict`) goes into checkpoints: a resumed loop draws the batches it would
    have drawn.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.taken = 0
        self._batches = self._generate()

    def _generate(self) -> Iterator[list[int]]:
        dist = distributed_context()
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            order = torch.randperm(self.n, generator=generator).tolist()[dist.rank::dist.world_size]
            if len(order) < self.batch_size:
                raise PbkdError(f"trainer.micro_batch_size={self.batch_size} exceeds the {len(order)} "
                                f"examples per rank")
            for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
                yield order[start:start + self.batch_size]

    def __iter__(self) -> "Minibatches":
        return self

    def __next__(self) -> list[int]:
        self.taken += 1
        return next(self._batches)

    def state_dict(self) -> dict:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.taken, self._batches = 0, self._generate()
        for _ in range(state["taken"]):
            next(self)
