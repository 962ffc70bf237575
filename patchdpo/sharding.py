"""Shard a frozen base model (UNet, FLUX transformer) over the processes with FSDP2 while its IP-Adapter trains.

Why: the frozen FLUX.1-dev transformer alone is ~23.8 GB in bf16 and the XLabs adapter with its
AdamW state another ~7.9 GB, more than a 24 GB card holds. `shard_frozen_base` gives every process
1/N of each (FSDP2 `fully_shard`, one unit per block named in the model's `_no_split_modules`, then
the root); a block is all-gathered only while it runs (`reshard_after_forward`), so the transient
is the root's own layers and two blocks (the running one and the prefetched next one).

Why directly and not through accelerate's FSDP plugin (`FullyShardedDataParallelPlugin(fsdp_version=2)`):
on CPU (`ACCELERATE_USE_CPU=1`, gloo) accelerate 1.15 silently drops the plugin: `AcceleratorState`
sets `DistributedType.FSDP` only for GPU-like multi-device types, so `MULTI_CPU` stays and
`prepare` wraps the model in DDP (checked: `is_fsdp2` False, a `DistributedDataParallel` back);
the sharded path could then never be tested here. It also needs the whole model passed to
`prepare`, which the trainer does not do for a frozen base. One direct path serves CPU and GPU.

Mixed precision: no FSDP `MixedPrecisionPolicy` by default. The base's shards keep the dtype it was
held in (bf16), the adapter's stay fp32 (FSDP2 groups may mix dtypes as long as the trainable ones
agree), and the trainer's own autocast casts for compute exactly as in an unsharded run, so the
two runs differ only in the order gradients are summed.

How the trainer wires it (the model is NOT passed to `accelerator.prepare`; the optimizer, data and
LR schedule still are):

    model = shard_frozen_base(model)                     # after freezing, before building the optimizer
    optimizer = AdamW(trainable_parameters(model), ...)
    with accelerator.accumulate(model), accelerator.autocast():
        with gradient_sync(model, accelerator.sync_gradients):   # reduce-scatter on the last micro-batch only
            accelerator.backward(loss)
        if accelerator.sync_gradients:
            clip_grad_norm(trainable_parameters(model), max_norm)
    # a checkpoint: every process gathers, the main one writes the same files as an unsharded run
    adapter = full_state_dict(adapter_modules)          # public "ip_adapter" keys, plain CPU tensors
    Resumable(weights=..., optimizer=GatheredOptimizer(optimizer).gather())
    # a resume: load_full_state_dict(adapter_modules, loaded) / GatheredOptimizer(optimizer).load_state_dict(...)
    # image_dpo's reference prediction: with torch.no_grad(), swapped_weights(model, reference): model(...)
    #   (reference = the trainable parameters' sharded copies, by name), not torch.func.functional_call

Every function here that gathers is a collective: call it on every process, in the same order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from common.live_memory import storage_key


def block_type_names(model: nn.Module) -> set[str]:
    """The block classes the model's libraries say must not be split (diffusers' `_no_split_modules`), over all submodules."""
    return {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or ())}


def _blocks(model: nn.Module, block_types: Iterable[str] | None) -> list[nn.Module]:
    """The modules that become FSDP units before the root, outermost first (the order of `modules()`)."""
    names = set(block_types) if block_types is not None else block_type_names(model)
    blocks = [module for module in model.modules() if type(module).__name__ in names and module is not model]
    if not blocks:
        raise ValueError(f"no blocks to shard in {type(model).__name__}: pass block_types (no _no_split_modules found)")
    return blocks


def shard_frozen_base(
    model: nn.Module,
    block_types: Iterable[str] | None = None,
    *,
    mesh: DeviceMesh | None = None,
    reshard_after_forward: bool = True,
    mp_policy: MixedPrecisionPolicy | None = None,
) -> FSDPModule:
    """`fully_shard` every block (innermost first, then the root) of a model whose base is frozen and whose adapter trains.

    Freeze and cast first: the shards keep each parameter's dtype and `requires_grad`. The
    trainable parameters of one block must share a dtype (FSDP2 reduce-scatters them together).
    """
    blocks = _blocks(model, block_types)
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy or MixedPrecisionPolicy())
    for block in reversed(blocks):  # modules() lists a parent before its children
        fully_shard(block, **kwargs)
    return fully_shard(model, **kwargs)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer gets (sharded `DTensor`s once the model is sharded)."""
    return [param for param in model.parameters() if param.requires_grad]


@contextlib.contextmanager
def gradient_sync(model: FSDPModule, enabled: bool) -> Iterator[None]:
    """Reduce-scatter the gradients of a backward inside only when `enabled` (the last micro-batch of an accumulation).

    Between, each process accumulates its unsharded adapter gradients locally (the adapter's full
    gradient size in memory; no communication), as DDP's `no_sync` does. Where that memory is short,
    pass True at every micro-batch: only shards are kept, for one reduce-scatter per micro-batch.
    """
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` over sharded gradients: the norm of the whole gradient (all shards), a plain tensor, on every process."""
    total = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return total.full_tensor() if isinstance(total, DTensor) else total


@contextlib.contextmanager
def swapped_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Run `model` with `weights` (named parameters of it, sharded as they are) in place of its own; restore them after.

    `torch.func.functional_call` does this for an unsharded model (image_dpo's frozen reference
    adapter), but FSDP2 all-gathers each block from its own shards and ignores parameters swapped on
    the module, so the reference would silently be the policy. Here the shards themselves are
    swapped (no gradient flows); a block's gathered copy is refilled from them at every all-gather,
    so a policy forward's pending backward still sees the policy's weights.
    """
    params = dict(model.named_parameters())
    with torch.no_grad():
        saved = {name: params[name].detach().clone() for name in weights}
        for name, value in weights.items():
            params[name].copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A (sharded) result as a plain tensor where it is (e.g. a gradient norm over shards); a collective for a `DTensor`."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()


def _shard_like(target: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` cut to this process's shard of `target` (no communication: every process holds `full`)."""
    if not isinstance(target, DTensor) or full.shape != target.shape:
        return full
    return distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with every shard gathered: plain CPU tensors, the keys an unsharded module has (collective)."""
    return {key: _full(tensor) for key, tensor in module.state_dict().items()}


def load_full_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Strictly load a full (unsharded) state dict into a sharded module; each process keeps its shard."""
    current = module.state_dict()
    module.load_state_dict({key: _shard_like(current[key], value) if key in current else value for key, value in state.items()})


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [param for group in optimizer.param_groups for param in group["params"]]


class GatheredOptimizer:
    """An optimizer's state as an unsharded run saves it, for `common.training_state.Resumable(optimizer=...)`.

    `optimizer.state_dict()` layout (integer parameter ids, same param_groups) with every shard
    gathered, so the saved file is the one an unsharded run writes and either run resumes from it.
    `gather()` is the collective, called on every process before the main one saves.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._gathered: dict[str, Any] | None = None

    def gather(self) -> GatheredOptimizer:
        state = self.optimizer.state_dict()
        per_param = {index: {name: _full(value) for name, value in values.items()} for index, values in sorted(state["state"].items())}
        self._gathered = {"state": per_param, "param_groups": state["param_groups"]}
        return self

    def state_dict(self) -> dict[str, Any]:
        if self._gathered is None:
            raise RuntimeError("GatheredOptimizer.state_dict() before gather(): gather on every process first")
        return self._gathered

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a full state dict (saved sharded or not); each process keeps its shard of every moment."""
        params = _optimizer_params(self.optimizer)
        per_param = {
            index: {name: _shard_like(params[int(index)], value) for name, value in values.items()}
            for index, values in state["state"].items()
        }
        self.optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})


@dataclass(frozen=True)
class HeldBytes:
    """Bytes of parameter storage this process holds (its shards, padding included)."""

    frozen: int
    trainable: int


def held_bytes(model: nn.Module) -> HeldBytes:
    """What this process holds of `model`'s parameters, each storage counted once."""
    seen: set[int] = set()
    held = {False: 0, True: 0}
    for param in model.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        storage = local.untyped_storage()
        if storage_key(local) not in seen:
            seen.add(storage_key(local))
            held[param.requires_grad] += storage.nbytes()
    return HeldBytes(frozen=held[False], trainable=held[True])


def shard_bytes(shape: torch.Size | tuple[int, ...], element_size: int, processes: int) -> int:
    """Bytes of the largest shard of one parameter over `processes` (FSDP2: dim 0 cut in `ceil(dim0 / N)` rows, padded)."""
    rows = -(-shape[0] // processes) if shape else 1
    return rows * element_size * (torch.Size(shape[1:]).numel() if shape else 1)


@dataclass(frozen=True)
class PlannedBytes:
    """What one process will hold of a model `shard_frozen_base` shards over some processes (bytes)."""

    frozen: int  # its shard of the frozen base
    trainable: int  # its shard of the trainable parameters; the gradient and each AdamW moment take as much in fp32
    trainable_unsharded: int  # the gradients one process accumulates between synchronisations (`gradient_sync(..., False)`)
    gathered_block: int  # the largest block, all-gathered while it runs
    gathered_root: int  # what the root unit holds beyond the blocks (embedders, output layers), gathered for the whole pass

    @property
    def gathered(self) -> int:
        """What is all-gathered at once beyond the shards: the root unit, the running block and the prefetched next one."""
        return self.gathered_root + 2 * self.gathered_block


def _unit_parameters(model: nn.Module, blocks: list[nn.Module]) -> list[list[nn.Parameter]]:
    """The parameters each FSDP unit owns: a block's own less those of blocks inside it, then the root's (the rest)."""
    claimed: set[int] = set()
    units = []
    for module in [*reversed(blocks), model]:
        own = [param for param in module.parameters() if id(param) not in claimed]
        claimed.update(id(param) for param in own)
        units.append(own)
    return units


def planned_bytes(model: nn.Module, processes: int, block_types: Iterable[str] | None = None) -> PlannedBytes:
    """`held_bytes` before sharding, by FSDP2's rule (each parameter's dim 0 cut in `processes` padded shards): works on meta."""

    def total(params: Iterable[nn.Parameter], over: int) -> int:
        return sum(shard_bytes(param.shape, param.element_size(), over) for param in params)

    params = list(model.parameters())
    frozen, trainable = [p for p in params if not p.requires_grad], [p for p in params if p.requires_grad]
    *blocks, root = _unit_parameters(model, _blocks(model, block_types))
    largest = max(total(unit, 1) for unit in blocks)
    return PlannedBytes(total(frozen, processes), total(trainable, processes), total(trainable, 1), largest, total(root, 1))
