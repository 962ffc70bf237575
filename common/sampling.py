"""Seeded per-epoch shuffling that tells every item which epoch it is drawn in."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from common.errors import BadInputError
from common.seeds import stable_seed


class EpochSampler(Sampler[tuple[int, int]]):
    """Shuffles by `(seed, epoch)` and yields `(index, epoch)` so items can seed their own randomness.

    The order of an epoch is then a function of the seed and the epoch alone (not of the global
    RNG, the number of workers or a resume), so `accelerate.skip_first_batches` resumes it exactly.
    Only the first `len(self)` items of the permutation are yielded: a whole number of
    `global_batch`es (pairs per optimizer step over all processes and accumulated micro-batches).
    Consecutive chunks of the permutation are then the optimizer steps whatever the layout, and no
    step is a short or padded one.
    """

    def __init__(self, num_items: int, seed: int, global_batch: int = 1) -> None:
        if num_items < global_batch:
            raise BadInputError(f"{num_items} training pairs do not fill one optimizer step of {global_batch} pairs")
        self.num_items = num_items
        self.seed = seed
        self.global_batch = global_batch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(stable_seed(self.seed, "shuffle", self.epoch))
        for index in torch.randperm(self.num_items, generator=generator)[: len(self)].tolist():
            yield index, self.epoch

    def __len__(self) -> int:
        return self.num_items - self.num_items % self.global_batch
