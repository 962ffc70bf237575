"""Bytes of tensor storage alive while code runs, counted by a dispatch mode: on real or fake tensors alike.

Under `FakeTensorMode` nothing is allocated, so the peak of a full SDXL training step is counted on a
CPU in seconds; on real tensors the same counter gives the bytes the same code really holds, which is
how the plan is checked. torch's `MemTracker` assumes every parameter trains and fails on a frozen
UNet; counting storages at the dispatcher sees every op output, autograd's saved tensors included
(a tensor's Python object lives as long as its C++ tensor does).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


class LiveStorageCounter(TorchDispatchMode):
    """Current and peak bytes of the storages created inside the mode; `existing` tensors (weights, inputs) are not counted."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.existing = {storage_key(tensor) for tensor in existing}
        self.live: dict[int, list[int]] = {}  # storage -> [bytes, tensors referring to it]
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args: tuple = (), kwargs: dict | None = None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        key = storage_key(tensor)
        if key in self.existing:
            return
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [tensor.untyped_storage().nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]
