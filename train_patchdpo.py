"""PatchDPO training: finetune an IP-Adapter (SDXL, SD 1.5 or FLUX.1, read from the model folder) on (reference, generated) pairs.

    accelerate launch --num_processes 8 --multi_gpu --mixed_precision fp16 train_patchdpo.py \
      --pretrained_model_name_or_path SDXL_DIR --image_encoder_path ENC_DIR \
      --pretrained_ip_adapter_path ip-adapter-plus_sdxl_vit-h.bin --data_root_path DATA \
      --patch_quality_file DATA/patch_quality.safetensors --resolution 512 --train_batch_size 4 \
      --dataloader_num_workers 4 --learning_rate 3e-05 --weight_decay 0.01 --save_steps 10000 \
      --stop_step 30000 --output_dir output/exp1/ --use_dpo_loss True

Flag names and defaults are the official script's; where the behaviour differs, and the switch back
(`--official_time_ids`, `--fp32_unet`), see docs/differences.md. The method (patch weights, objectives,
the step) lives in `patchdpo.method`, the loop in `patchdpo.loop`, the robustness around it in `patchdpo.run`, the step arithmetic and optimizer in `patchdpo.optimization`.
Any layout of processes x `--train_batch_size` x `--gradient_accumulation_steps` with the same
product trains the same global batches with the same randomness (README "Training").
"""

from __future__ import annotations

import argparse
import functools
import sys

from common.cli import ArgumentParser, exit_on_reported_error, parse_config, quiet_libraries, str2bool
from common.flags import (
    CHANGEABLE_ON_RESUME,
    LOSS_MODES,
    LR_SCHEDULERS,
    add_ddp_timeout_arg,
    add_flow_matching_args,
    add_speed_args,
    add_validation_args,
)
from dreambench.config import ValidationSettings
from patchdpo.config import TrainingConfig

PROG = "train_patchdpo.py"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    official = parser.add_argument_group("official flags (train_patchdpo.py of hqhQAQ/PatchDPO)")
    official.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="SDXL, SD 1.5 or FLUX.1 pipeline: folder or Hugging Face id (the family is read from its model_index.json)",
    )
    official.add_argument(
        "--pretrained_ip_adapter_path",
        default=None,
        help="IP-Adapter checkpoint to start from (h94's Plus layout; FLUX: XLabs' ip_adapter.safetensors); absent: SDXL/SD 1.5 "
        "adapter from to_k/to_v with a fresh frozen Resampler, FLUX a fresh adapter (zero k/v, seeded projection)",
    )
    official.add_argument("--data_root_path", required=True, help="folder of sample{i}/ pairs")
    official.add_argument("--image_encoder_path", required=True, help="CLIP vision model: folder or Hugging Face id (REPO_ID[/subfolder])")
    official.add_argument("--output_dir", default="sd-ip_adapter")
    official.add_argument("--logging_dir", default="logs", help="TensorBoard folder, relative to --output_dir")
    official.add_argument("--resolution", type=int, default=512)
    official.add_argument("--learning_rate", type=float, default=1e-4)
    official.add_argument("--weight_decay", type=float, default=1e-2)
    official.add_argument("--num_train_epochs", type=int, default=100)
    official.add_argument(
        "--train_batch_size",
        type=int,
        default=8,
        help="pairs per process per micro-batch; an optimizer step trains train_batch_size x processes x "
        "gradient_accumulation_steps pairs, and each epoch drops the pairs that do not fill a whole such step",
    )
    official.add_argument("--noise_offset", type=float, default=None)
    official.add_argument("--dataloader_num_workers", type=int, default=0)
    official.add_argument("--stop_step", type=int, default=30000, help="optimizer steps to train")
    official.add_argument("--save_steps", type=int, default=2000, help="write checkpoint-N/model.bin every N optimizer steps")
    official.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    official.add_argument(
        "--report_to", default="tensorboard", help="accelerate's experiment tracker (tensorboard, wandb, ... or all), installed"
    )
    official.add_argument("--local_rank", type=int, default=-1, help="ignored: accelerate sets the rank")
    official.add_argument("--patch_quality_file", default=None, help="quality maps (needed by --loss patch_dpo)")
    official.add_argument(
        "--use_dpo_loss", type=str2bool, default=None, help="official switch: True = --loss patch_dpo, False (default) = --loss mse"
    )

    extra = parser.add_argument_group("beyond the official script")
    extra.add_argument("--revision", default=None, help="revision of a --pretrained_model_name_or_path id (branch, tag or commit)")
    extra.add_argument(
        "--variant", default=None, help="weight variant of the SDXL files to load, e.g. fp16 (as diffusers' from_pretrained)"
    )
    extra.add_argument("--loss", choices=LOSS_MODES, default=None, help="objective (see patchdpo/method.py)")
    extra.add_argument("--dpo_beta", type=float, default=5000.0, help="beta of --loss image_dpo")
    extra.add_argument(
        "--official_time_ids",
        action="store_true",
        help="feed the reference code's scrambled SDXL time ids (see base_models/sdxl.py)",
    )
    extra.add_argument("--seed", type=int, default=42)
    extra.add_argument("--generated_per_sample", type=int, default=1, help="use gen_0..gen_{n-1} of each sample")
    extra.add_argument("--image_drop_rate", type=float, default=0.05)
    extra.add_argument("--text_drop_rate", type=float, default=0.05)
    extra.add_argument("--both_drop_rate", type=float, default=0.05)
    extra.add_argument(
        "--checkpointing_steps",
        type=int,
        default=None,
        help="also save the full training state (optimizer, step) in checkpoint-N/training_state",
    )
    extra.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="'latest' (the newest training state in --output_dir that checks out; none there: start at step 0), a checkpoint-N "
        "name in --output_dir, or a checkpoint folder's path; the run's settings must equal the ones recorded with that state",
    )
    extra.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="start over in an --output_dir that holds an earlier run: once the inputs are checked, remove its checkpoint-N "
        "folders and its TensorBoard logs (<logging_dir>/patchdpo); everything else in the folder stays",
    )
    extra.add_argument(
        "--change_on_resume",
        nargs="+",
        default=[],
        choices=CHANGEABLE_ON_RESUME,
        metavar="SETTING",
        help=f"settings a resume may change deliberately (one of {', '.join(CHANGEABLE_ON_RESUME)}): the optimizer, the schedule "
        "and the logged hyper-parameters then all take the new values",
    )
    extra.add_argument("--cache_dir", default=None, help="precompute the frozen encoders' outputs once, here")
    extra.add_argument("--gradient_checkpointing", action="store_true")
    extra.add_argument("--logging_steps", type=int, default=10)
    extra.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step (1: the official behaviour)"
    )
    extra.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="constant", help="diffusers' get_scheduler, in optimizer steps")
    extra.add_argument("--lr_warmup_steps", type=int, default=0, help="warmup optimizer steps (for the *_with_warmup / decaying schedules)")
    extra.add_argument("--max_grad_norm", type=float, default=None, help="clip the gradient norm to this (off by default, as officially)")
    extra.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="keep only the newest N training states (model.bin files stay); the last complete one is never deleted",
    )
    extra.add_argument(
        "--fp32_unet",
        action="store_true",
        help="keep the frozen UNet in float32 under autocast, as the official script does: its weights are not rounded to "
        "fp16/bf16 (+2 bytes per UNet weight: +5.1 GB for SDXL's 2.57 B-parameter UNet). Only the UNet's precision: the "
        "latents and noise (fp32 here), the Resampler (cast here) and the random draws still differ, docs/differences.md "
        "rows 4, 12, 13. Default: the UNet in the mixed-precision dtype",
    )
    extra.add_argument(
        "--use_8bit_adam",
        action="store_true",
        help="bitsandbytes' 8-bit AdamW: the optimizer moments take 1 byte per weight instead of 8 (CUDA, pip install bitsandbytes)",
    )
    extra.add_argument(
        "--shard_base",
        action="store_true",
        help="shard the frozen base model (FLUX transformer or UNet) over the processes with FSDP2, each holding 1/N of it; "
        "the adapter trains as unsharded (docs/memory.md: what fits where). Needs 2+ processes; not with validation",
    )
    extra.add_argument("--fused_adamw", action="store_true", help="fused AdamW kernel (the same update; faster on CUDA)")
    add_speed_args(extra)
    add_ddp_timeout_arg(extra)
    add_validation_args(parser)
    add_flow_matching_args(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainingConfig:
    """The run's settings, built once and checked (`TrainingConfig.checked`: a bad value is a `BadInputError` naming its flag)."""
    return parse_config(build_parser(), TrainingConfig, argv).checked()


def validation_settings(config: TrainingConfig) -> ValidationSettings | None:
    """What validation during training needs of the flags; None when --validation_data_root is not given."""
    if config.validation_data_root is None:
        return None
    return ValidationSettings(
        data_root=config.validation_data_root,
        every=config.validation_steps or config.save_steps,
        subjects=config.validation_subjects,
        prompts_per_subject=config.validation_prompts,
        num_inference_steps=config.validation_num_inference_steps,
        scale=config.validation_scale,
        size=config.validation_size or config.resolution,
        clip_model=config.clip_model,
        dino_model=config.dino_model,
    )


@exit_on_reported_error(PROG)
def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    validation = validation_settings(config)
    # Imported once the flags are checked: --help must not wait for torch, accelerate and diffusers.
    from dreambench.validation import TrainingValidation
    from patchdpo.run import run_training

    quiet_libraries()
    exit_code = run_training(config, PROG, functools.partial(TrainingValidation, validation) if validation else None)
    if exit_code:
        sys.exit(exit_code)  # stopped by a signal after saving (common.stop_signals)


if __name__ == "__main__":
    main()
