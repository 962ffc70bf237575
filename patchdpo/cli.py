"""The command line of `python -m patchdpo.memory_plan`, built without torch; the Namespace ends here.

`memory_plan_config` parses it into `MemoryPlanConfig` (one field per flag, `common.cli.parse_config`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.cli import ArgumentParser, parse_config

MEMORY_PLAN_PROG = "python -m patchdpo.memory_plan"
MEMORY_PLAN_DESCRIPTION = "Will it fit my GPU? The peak memory of one training process, planned on a CPU without allocating it."
#: --mixed_precision's choices (`patchdpo.memory_plan.PRECISIONS` maps them to dtypes)
PRECISION_CHOICES = ("no", "fp16", "bf16")


@dataclass(frozen=True)
class MemoryPlanConfig:
    """python -m patchdpo.memory_plan: the models' configs, the training settings memory depends on, and where to write the plan."""

    pretrained_model_name_or_path: str
    image_encoder_path: str
    resolution: int
    train_batch_size: int
    mixed_precision: str
    gradient_checkpointing: bool
    cache_dir: bool
    fp32_unet: bool
    use_8bit_adam: bool
    gpus: int
    shard_base: bool
    validation_size: int | None
    json: Path | None


def memory_plan_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=MEMORY_PLAN_PROG, description=MEMORY_PLAN_DESCRIPTION)
    parser.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="SDXL, SD 1.5 or FLUX.1 pipeline: folder or Hugging Face id (only model_index.json and config.json files are read)",
    )
    parser.add_argument(
        "--image_encoder_path", required=True, help="the adapter's CLIP vision encoder: folder or Hugging Face id (config.json)"
    )
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--train_batch_size", type=int, default=4, help="pairs per GPU per micro-batch")
    parser.add_argument("--mixed_precision", choices=PRECISION_CHOICES, default="fp16")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument(
        "--cache_dir", action="store_true", help="plan a run with --cache_dir (the encoders are freed after the cache is built)"
    )
    parser.add_argument("--fp32_unet", action="store_true")
    parser.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' AdamW8bit: 1 byte per moment")
    parser.add_argument("--gpus", type=int, default=1, help="processes of the run (more than 1: DDP's gradient buckets)")
    parser.add_argument(
        "--shard_base", action="store_true", help="plan the frozen base sharded over the --gpus processes (FSDP2, patchdpo.sharding)"
    )
    parser.add_argument("--validation_size", type=int, default=None, help="plan validation during training at this image size")
    parser.add_argument("--json", type=Path, default=None, help="write {peak_bytes, components, ...} here")
    return parser


def memory_plan_config(argv: Sequence[str] | None = None) -> MemoryPlanConfig:
    return parse_config(memory_plan_parser(), MemoryPlanConfig, argv)
