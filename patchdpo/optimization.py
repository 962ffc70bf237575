"""The optimizer, its learning-rate schedule and where a run stands, all counted in optimizer steps.

One optimizer step trains on a fixed global batch: `train_batch_size` pairs per micro-batch x
processes x `gradient_accumulation_steps` micro-batches. `--stop_step`, the checkpoints, logging
and the LR schedule count these steps, so 8 GPUs x 4 pairs, 1 GPU x 4 pairs x 8 accumulated
micro-batches and every layout in between run the same optimisation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from diffusers.optimization import get_scheduler

from common.errors import BadInputError


def adamw(
    params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, fused: bool = False, eight_bit: bool = False
) -> torch.optim.Optimizer:
    """The official AdamW; `fused` runs each step as one kernel (the same update, fewer launches on CUDA).

    `eight_bit`: bitsandbytes' AdamW8bit, whose two moments take 1 byte per weight instead of 4 each
    (-1.9 GiB for the IP-Adapter-Plus layers of SDXL; `check_8bit_adam` first).
    """
    if eight_bit:
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def check_8bit_adam(device: torch.device) -> None:
    """`--use_8bit_adam` needs bitsandbytes on a CUDA device: otherwise one line, before any model loads."""
    if device.type != "cuda":
        raise BadInputError(f"--use_8bit_adam needs a CUDA GPU (bitsandbytes' 8-bit AdamW), this run is on {device.type}; leave it out")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise BadInputError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None


def lr_scheduler(
    name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, last_epoch: int = -1
) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' `get_scheduler`, stepped once per optimizer step (not once per process, as a prepared one would be)."""
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps, last_epoch=last_epoch)


def require_one_step(num_pairs: int, train_batch_size: int, num_processes: int, accumulation: int) -> None:
    """Every epoch drops the pairs that do not fill a whole optimizer step, so a set smaller than one step trains
    nothing: one line naming the flag that makes it fit (a few photos of one subject give a handful of pairs)."""
    per_step = train_batch_size * num_processes * accumulation
    if num_pairs >= per_step:
        return
    processes = f"{num_processes} process{'es' if num_processes > 1 else ''}"
    problem = (
        f"{num_pairs} training pairs do not fill one optimizer step of {per_step} pairs "
        f"(--train_batch_size {train_batch_size} x {processes} x --gradient_accumulation_steps {accumulation})"
    )
    if num_pairs >= num_processes * accumulation:
        fix = f"pass --train_batch_size {num_pairs // (num_processes * accumulation)} or fewer"
    elif num_pairs >= num_processes:
        fix = f"pass --train_batch_size 1 --gradient_accumulation_steps {num_pairs // num_processes} or fewer"
    else:
        fix = f"launch at most {num_pairs} process(es) with --train_batch_size 1 --gradient_accumulation_steps 1"
    raise BadInputError(f"{problem}: {fix}, or make more pairs (construct's --num_generated with --generated_per_sample)")


@dataclass(frozen=True)
class StepPlan:
    """Optimizer steps of a run over a loader that yields `micro_batches_per_epoch` per process."""

    micro_batches_per_epoch: int
    accumulation: int
    total_steps: int

    @classmethod
    def create(cls, micro_batches_per_epoch: int, accumulation: int, stop_step: int, num_train_epochs: int) -> StepPlan:
        if micro_batches_per_epoch % accumulation:
            raise ValueError(f"{micro_batches_per_epoch} micro-batches per epoch are not whole steps of {accumulation}")
        steps_per_epoch = micro_batches_per_epoch // accumulation
        return cls(micro_batches_per_epoch, accumulation, min(stop_step, num_train_epochs * steps_per_epoch))

    @property
    def steps_per_epoch(self) -> int:
        return self.micro_batches_per_epoch // self.accumulation

    def position(self, global_step: int) -> tuple[int, int]:
        """(epoch, micro-batches of it already trained) after `global_step` optimizer steps."""
        epoch, steps = divmod(global_step, self.steps_per_epoch)
        return epoch, steps * self.accumulation
