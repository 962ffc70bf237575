"""The memory tables of docs/memory.md: `patchdpo.memory_plan` over the variants a researcher picks between.

    python benchmarks/memory_table.py [--base_model sdxl|flux|all]
        [--pretrained_model_name_or_path MODEL --image_encoder_path ENC]

Without model paths it plans the published configs (config files only): SDXL + CLIP ViT-H
(`stand_ins.sdxl.FULL`) and FLUX.1-dev + CLIP ViT-L/14 (`stand_ins.flux.FULL`). Prints one Markdown
table per base model. Run time: about 5 CPU-seconds per SDXL row and 8 per FLUX row (the 57
transformer blocks run op by op on fake tensors): ~3 CPU-minutes for both tables, 11 minutes wall
for the FLUX table alone on the shared 2-core VM under load (`--base_model flux`).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

SDXL_VARIANTS = [
    ("the paper: fp16, 4 pairs per GPU", {}),
    ("2 pairs per GPU", {"train_batch_size": 2}),
    ("1 pair per GPU", {"train_batch_size": 1}),
    ("--gradient_checkpointing", {"gradient_checkpointing": True}),
    ("--cache_dir", {"cache_dir": True}),
    ("bf16", {"mixed_precision": "bf16"}),
    ("fp32 (--mixed_precision no)", {"mixed_precision": "no"}),
    ("--fp32_unet (the official script's fp32 UNet)", {"fp32_unet": True}),
    ("--use_8bit_adam (bitsandbytes)", {"use_8bit_adam": True}),
    ("8 GPUs (DDP buckets)", {"gpus": 8}),
    ("validation at 1024 px", {"validation_size": 1024}),
    ("2 pairs, validation at 1024 px", {"train_batch_size": 2, "validation_size": 1024}),
    ("--cache_dir, validation at 1024 px", {"cache_dir": True, "validation_size": 1024}),
    ("1 pair, --gradient_checkpointing, --cache_dir", {"train_batch_size": 1, "gradient_checkpointing": True, "cache_dir": True}),
    ("2 pairs, --gradient_checkpointing, --cache_dir", {"train_batch_size": 2, "gradient_checkpointing": True, "cache_dir": True}),
]
_CHECKPOINTED_CACHED = {"gradient_checkpointing": True, "cache_dir": True}
#: FLUX trains in bf16 (the published weights' dtype), one pair per GPU unless named.
FLUX_VARIANTS = [
    ("512 px", {}),
    ("512 px, --gradient_checkpointing", {"gradient_checkpointing": True}),
    ("512 px, --cache_dir", {"cache_dir": True}),
    ("512 px, --gradient_checkpointing, --cache_dir", _CHECKPOINTED_CACHED),
    ("512 px, 4 pairs, --gradient_checkpointing, --cache_dir", {"train_batch_size": 4, **_CHECKPOINTED_CACHED}),
    ("1024 px", {"resolution": 1024}),
    ("1024 px, --cache_dir", {"resolution": 1024, "cache_dir": True}),
    ("1024 px, --gradient_checkpointing, --cache_dir", {"resolution": 1024, **_CHECKPOINTED_CACHED}),
    ("512 px, --cache_dir, 8 GPUs, --shard_base", {"cache_dir": True, "gpus": 8, "shard_base": True}),
    ("512 px, --gradient_checkpointing, --cache_dir, 8 GPUs, --shard_base", {"gpus": 8, "shard_base": True, **_CHECKPOINTED_CACHED}),
    (
        "1024 px, --gradient_checkpointing, --cache_dir, 2 GPUs, --shard_base",
        {"resolution": 1024, "gpus": 2, "shard_base": True, **_CHECKPOINTED_CACHED},
    ),  # fmt: skip
    (
        "1024 px, --gradient_checkpointing, --cache_dir, 8 GPUs, --shard_base",
        {"resolution": 1024, "gpus": 8, "shard_base": True, **_CHECKPOINTED_CACHED},
    ),  # fmt: skip
]
BASES = {
    "sdxl": ("512 px, per GPU", {}, SDXL_VARIANTS),
    "flux": ("FLUX.1-dev, bf16, 1 pair per GPU", {"mixed_precision": "bf16", "train_batch_size": 1}, FLUX_VARIANTS),
}


def published_configs(base: str, folder: Path) -> tuple[str, str]:
    """(model folder, image-encoder folder) holding only the published config files of `base`."""
    from stand_ins import flux, sdxl

    if base == "flux":
        paths = flux.save_flux_configs(folder, flux.FULL)
        return str(paths.flux_dir), str(paths.image_encoder_dir)
    paths = sdxl.save_model_configs(folder, sdxl.FULL)
    return str(paths.sdxl_dir), str(paths.image_encoder_dir)


def print_table(base: str, model: str, image_encoder: str) -> None:
    from patchdpo.memory_plan import GIB, PlanSettings, plan_training_memory

    title, defaults, variants = BASES[base]
    print(f"| {title} | weights + optimizer | largest phase | peak | smallest card |")
    print("|---|---|---|---|---|")
    for name, changes in variants:
        plan = plan_training_memory(model, image_encoder, PlanSettings(**{**defaults, **changes}))
        card = plan["smallest_card_gib"]
        phase = plan["peak_phase"].split(" (")[0]
        print(
            f"| {name} | {plan['static_bytes'] / GIB:.1f} GiB | {phase}: {plan['components'][plan['peak_phase']] / GIB:.1f} GiB "
            f"| **{plan['peak_bytes'] / GIB:.1f} GiB** | {f'{card} GB' if card else 'none'} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base_model", choices=(*BASES, "all"), default="all", help="which variants (and published configs) to plan")
    parser.add_argument("--pretrained_model_name_or_path", default=None, help="plan this model instead of the published configs")
    parser.add_argument("--image_encoder_path", default=None)
    args = parser.parse_args()
    bases = tuple(BASES) if args.base_model == "all" else (args.base_model,)
    for base in bases:
        with tempfile.TemporaryDirectory() as folder:
            model, encoder = args.pretrained_model_name_or_path, args.image_encoder_path
            if model is None:
                model, encoder = published_configs(base, Path(folder))
            print_table(base, model, encoder)
        print()


if __name__ == "__main__":
    main()
