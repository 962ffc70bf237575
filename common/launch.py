"""Launch checks every multi-process script runs first, before any model loads.

`accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs starts two processes
(torchrun sets `WORLD_SIZE=2`), but accelerate finds no GPU backend and gives each of them a
one-process state: both would run the whole job, log as rank 0 and write the same files. The
environment says what the launcher started; the script compares it with what accelerate sees.
"""

from __future__ import annotations

import os

from common.errors import BadInputError

CPU_LAUNCH = "ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N"


def check_launch(num_processes: int, script: str) -> None:
    """Refuse a launch whose processes would each run alone (`WORLD_SIZE` > accelerate's process count)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > num_processes:
        raise BadInputError(
            f"launched as {launched} processes (WORLD_SIZE={launched}) but accelerate sees {num_processes}, so each would "
            f"repeat the whole job (--multi_gpu without GPUs?); on CPU launch with `{CPU_LAUNCH} {script} ...`"
        )


def check_mixed_precision(mixed_precision: str, device_type: str) -> None:
    """fp16 on CPU would fail in the first step (accelerate disables fp16 autocast there); say so up front."""
    if mixed_precision == "fp16" and device_type == "cpu":
        raise BadInputError("--mixed_precision fp16 needs a CUDA GPU and none is in use; on CPU use --mixed_precision bf16 or no")
