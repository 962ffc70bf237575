"""The memory table of docs/memory.md: `patchdpo.memory_plan` over the variants a researcher picks between.

    python benchmarks/memory_table.py [--pretrained_model_name_or_path SDXL --image_encoder_path ENC]

Without model paths it plans the published SDXL / CLIP ViT-H configs (`stand_ins.sdxl.FULL`, config
files only). Prints a Markdown table; about 10 s per row on a CPU.
"""

from __future__ import annotations

import argparse
import tempfile

VARIANTS = [
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


def main() -> None:
    from patchdpo.memory_plan import GIB, PlanSettings, plan_training_memory
    from stand_ins.sdxl import FULL, save_model_configs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained_model_name_or_path", default=None)
    parser.add_argument("--image_encoder_path", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        if args.pretrained_model_name_or_path is None:
            paths = save_model_configs(folder, FULL)
            args.pretrained_model_name_or_path, args.image_encoder_path = str(paths.sdxl_dir), str(paths.image_encoder_dir)
        print("| 512 px, per GPU | weights + optimizer | largest phase | peak | smallest card |")
        print("|---|---|---|---|---|")
        for name, changes in VARIANTS:
            plan = plan_training_memory(args.pretrained_model_name_or_path, args.image_encoder_path, PlanSettings(**changes))
            card = plan["smallest_card_gib"]
            phase = plan["peak_phase"].split(" (")[0]
            print(
                f"| {name} | {plan['static_bytes'] / GIB:.1f} GiB | {phase}: {plan['components'][plan['peak_phase']] / GIB:.1f} GiB "
                f"| **{plan['peak_bytes'] / GIB:.1f} GiB** | {f'{card} GB' if card else 'none'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
