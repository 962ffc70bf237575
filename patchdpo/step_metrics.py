"""What an optimizer step logs: its loss over the whole global batch, and the pairs trained per second."""

from __future__ import annotations

import time

import torch
from accelerate import Accelerator

from .method import LossOutput


class StepMeter:
    """Means over an optimizer step's micro-batches of the loss and its extras, and throughput since the last log.

    Every micro-batch holds the same number of pairs, so the mean of the micro-batch means,
    averaged over processes, is the loss of the global batch: the same number whatever the layout.
    """

    def __init__(self, pairs_per_step: int) -> None:
        self.pairs_per_step = pairs_per_step
        self._sums: dict[str, torch.Tensor] = {}
        self._micro_batches = 0
        self._window_start = time.perf_counter()
        self._window_steps = 0

    def add(self, output: LossOutput) -> None:
        for name, value in {"loss": output.loss, **output.logs}.items():
            self._sums[name] = self._sums.get(name, 0) + value.detach().float()
        self._micro_batches += 1

    def end_step(self) -> dict[str, torch.Tensor]:
        """This step's means on this process; starts the next step."""
        means = {name: total / self._micro_batches for name, total in self._sums.items()}
        self._sums, self._micro_batches = {}, 0
        self._window_steps += 1
        return means

    def logs(self, accelerator: Accelerator, means: dict[str, torch.Tensor]) -> dict[str, float]:
        """Global-batch means (reduced over processes) and pairs/s since the previous call."""
        logs = {name: accelerator.reduce(value, "mean").item() for name, value in means.items()}
        logs["samples_per_s"] = self.pairs_per_step * self._window_steps / (time.perf_counter() - self._window_start)
        self._window_start, self._window_steps = time.perf_counter(), 0
        return logs
