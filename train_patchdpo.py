"""PatchDPO training: finetune IP-Adapter-Plus (SDXL) on (reference, generated) pairs.

    accelerate launch --num_processes 8 --multi_gpu --mixed_precision fp16 train_patchdpo.py \
      --pretrained_model_name_or_path SDXL_DIR --image_encoder_path ENC_DIR \
      --pretrained_ip_adapter_path ip-adapter-plus_sdxl_vit-h.bin --data_root_path DATA \
      --patch_quality_file DATA/patch_quality.safetensors --resolution 512 --train_batch_size 4 \
      --dataloader_num_workers 4 --learning_rate 3e-05 --weight_decay 0.01 --save_steps 10000 \
      --stop_step 30000 --output_dir output/exp1/ --use_dpo_loss True

Flags and defaults follow the official script; the step itself lives in `patchdpo.training`,
the objectives in `patchdpo.loss`.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

from common.cli import ArgumentParser, fail, quiet_libraries, str2bool
from common.flags import LOSS_MODES, add_validation_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    official = parser.add_argument_group("official flags (train_patchdpo.py of hqhQAQ/PatchDPO)")
    official.add_argument("--pretrained_model_name_or_path", required=True, help="SDXL pipeline: folder or Hugging Face id")
    official.add_argument(
        "--pretrained_ip_adapter_path",
        default=None,
        help="IP-Adapter-Plus checkpoint (file or REPO_ID/path/in/repo.bin) to start from; absent: adapter from to_k/to_v, fresh Resampler",
    )
    official.add_argument("--data_root_path", required=True, help="folder of sample{i}/ pairs")
    official.add_argument("--image_encoder_path", required=True, help="CLIP vision model: folder or Hugging Face id (REPO_ID[/subfolder])")
    official.add_argument("--output_dir", default="sd-ip_adapter")
    official.add_argument("--logging_dir", default="logs", help="TensorBoard folder, relative to --output_dir")
    official.add_argument("--resolution", type=int, default=512)
    official.add_argument("--learning_rate", type=float, default=1e-4)
    official.add_argument("--weight_decay", type=float, default=1e-2)
    official.add_argument("--num_train_epochs", type=int, default=100)
    official.add_argument("--train_batch_size", type=int, default=8, help="pairs per process")
    official.add_argument("--noise_offset", type=float, default=None)
    official.add_argument("--dataloader_num_workers", type=int, default=0)
    official.add_argument("--stop_step", type=int, default=30000)
    official.add_argument("--save_steps", type=int, default=2000, help="write checkpoint-N/model.bin every N steps")
    official.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    official.add_argument("--report_to", default="tensorboard")
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
    extra.add_argument("--loss", choices=LOSS_MODES, default=None, help="objective (see patchdpo/loss.py)")
    extra.add_argument("--dpo_beta", type=float, default=5000.0, help="beta of --loss image_dpo")
    extra.add_argument(
        "--official_time_ids",
        action="store_true",
        help="feed the reference code's scrambled SDXL time ids (see patchdpo/sdxl_conditioning.py)",
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
    extra.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-N folder")
    extra.add_argument("--cache_dir", default=None, help="precompute the frozen encoders' outputs once, here")
    extra.add_argument("--gradient_checkpointing", action="store_true")
    extra.add_argument("--logging_steps", type=int, default=10)
    add_validation_args(parser)
    args = parser.parse_args(argv)

    loss_from_switch = None if args.use_dpo_loss is None else ("patch_dpo" if args.use_dpo_loss else "mse")
    if args.loss is not None and loss_from_switch is not None and args.loss != loss_from_switch:
        parser.error(f"--loss {args.loss} contradicts --use_dpo_loss {args.use_dpo_loss} (which means --loss {loss_from_switch})")
    args.loss = args.loss or loss_from_switch or "mse"
    if args.loss == "patch_dpo" and args.patch_quality_file is None:
        parser.error("--loss patch_dpo (--use_dpo_loss True) needs --patch_quality_file")
    for name in (
        "train_batch_size",
        "stop_step",
        "save_steps",
        "generated_per_sample",
        "logging_steps",
        "checkpointing_steps",
        "validation_steps",
        "validation_prompts",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Imported once the arguments are parsed: --help must not wait for torch, accelerate and diffusers.
    import torch
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import ProjectConfiguration, release_memory, set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from common.errors import BadInputError
    from common.seeds import stable_seed
    from common.training_state import TRAINING_STATE_DIR, checkpoint_step, find_resume_checkpoint, save_training_state
    from dreambench.validation import TrainingValidation
    from patch_quality.store import QualityMaps
    from patchdpo.feature_cache import FeatureCache, build_feature_cache, cache_key
    from patchdpo.pair_dataset import DropoutRates, EpochSampler, PairDataset, index_pairs
    from patchdpo.training import (
        PairConditioning,
        frozen_adapter_copy,
        load_training_models,
        register_adapter_state_hooks,
        save_adapter_checkpoint,
        training_step,
        vae_downsample_factor,
    )

    logger = get_logger(__name__)
    quiet_libraries()
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.info(f"loss={args.loss} time_ids={'official' if args.official_time_ids else 'per-image'}", main_process_only=True)
    set_seed(args.seed)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    try:
        models = load_training_models(
            args.pretrained_model_name_or_path,
            args.image_encoder_path,
            args.pretrained_ip_adapter_path,
            accelerator.device,
            weight_dtype,
            revision=args.revision,
            variant=args.variant,
        )
        factor = vae_downsample_factor(models.encoders.vae)
        if args.resolution % factor:
            raise BadInputError(f"--resolution {args.resolution} is not a multiple of the VAE's downsampling factor {factor}")
        latent_size = args.resolution // factor
        quality_maps = QualityMaps.load(args.patch_quality_file) if args.loss == "patch_dpo" else None
        pairs = index_pairs(args.data_root_path, quality_maps, args.generated_per_sample, latent_size)
        dropout = DropoutRates(args.image_drop_rate, args.text_drop_rate, args.both_drop_rate)
        resume_dir = find_resume_checkpoint(output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
        encoders, tokenizers, cache = models.encoders, models.encoders.tokenizers, None
        if args.cache_dir is not None:
            key = cache_key(args.resolution, args.pretrained_model_name_or_path, args.image_encoder_path, weight_dtype)
            cache = FeatureCache.for_key(args.cache_dir, key)
            build_feature_cache(
                cache,
                pairs,
                encoders,
                args.resolution,
                accelerator.process_index,
                accelerator.num_processes,
                show_progress=accelerator.is_local_main_process,
            )
            accelerator.wait_for_everyone()
            # non-square references: their random CLIP crop is encoded each step (patchdpo/feature_cache.py)
            clip_encoder = encoders.image_encoder if cache.use_clip_per_step(pairs) else None
            encoders = models.encoders = None  # the frozen encoders are not needed any more: free their memory
            release_memory()
        validation = TrainingValidation(args, accelerator, args.seed) if args.validation_data_root else None
    except BadInputError as error:
        fail("train_patchdpo.py", error)

    dataset = PairDataset(pairs, args.resolution, latent_size, args.seed, tokenizers, quality_maps, dropout, cache)
    train_dataloader = DataLoader(
        dataset, batch_size=args.train_batch_size, sampler=EpochSampler(len(dataset), args.seed), num_workers=args.dataloader_num_workers
    )
    model = models.model
    if args.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    reference_params = frozen_adapter_copy(model) if args.loss == "image_dpo" else None
    optimizer = torch.optim.AdamW(model.adapter_modules.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    register_adapter_state_hooks(accelerator, model)
    prepared_model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)

    global_step = 0
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir / TRAINING_STATE_DIR))
        global_step = checkpoint_step(resume_dir)
        logger.info(f"resumed from {resume_dir} at step {global_step}")
    elif args.resume_from_checkpoint:
        logger.info(f"no checkpoint with a training state in {output_dir}: starting from step 0")
    batches_per_epoch = len(train_dataloader)
    total_steps = min(args.stop_step, args.num_train_epochs * batches_per_epoch)
    first_epoch, skip_batches = divmod(global_step, batches_per_epoch)
    hparams = {name: value if isinstance(value, (int, float, str, bool)) else str(value) for name, value in vars(args).items()}
    accelerator.init_trackers("patchdpo", config=hparams)
    progress = tqdm(total=total_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    if validation:
        validation(global_step, model.adapter_modules)  # the adapter this run starts from
    pairs_per_step = args.train_batch_size * accelerator.num_processes
    window_start, window_steps, last_saved = time.perf_counter(), 0, None

    for epoch in range(first_epoch, args.num_train_epochs):
        if global_step >= total_steps:
            break
        train_dataloader.set_epoch(epoch)
        skip = skip_batches if epoch == first_epoch else 0
        loader = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        for batch in loader:
            cond = PairConditioning.encode(encoders, batch) if cache is None else PairConditioning.from_cached_batch(batch, clip_encoder)
            output = training_step(
                accelerator,
                prepared_model,
                cond,
                models.scheduler,
                loss_mode=args.loss,
                seed=stable_seed(args.seed, "step", global_step, accelerator.process_index),
                resolution=args.resolution,
                official_time_ids=args.official_time_ids,
                noise_offset=args.noise_offset,
                reference_params=reference_params,
                dpo_beta=args.dpo_beta,
            )
            accelerator.backward(output.loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            window_steps += 1
            progress.update(1)

            if global_step % args.logging_steps == 0 or global_step == total_steps:
                logs = {"loss": accelerator.reduce(output.loss.detach(), "mean").item(), "lr": optimizer.param_groups[0]["lr"]}
                logs.update({name: value.item() for name, value in output.logs.items()})
                logs["samples_per_s"] = pairs_per_step * window_steps / (time.perf_counter() - window_start)
                if not math.isfinite(logs["loss"]):
                    raise FloatingPointError(f"loss is {logs['loss']} at step {global_step}")
                accelerator.log(logs, step=global_step)
                progress.set_postfix(loss=f"{logs['loss']:.4g}", pairs_per_s=f"{logs['samples_per_s']:.2f}")
                window_start, window_steps = time.perf_counter(), 0
            if global_step % args.save_steps == 0 or global_step == total_steps:
                if accelerator.is_main_process:
                    save_adapter_checkpoint(output_dir / f"checkpoint-{global_step}", model)
                last_saved = global_step
            if validation and validation.due(global_step):
                validation(global_step, model.adapter_modules)
            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                save_training_state(accelerator, output_dir / f"checkpoint-{global_step}")
            if global_step >= total_steps:
                break

    if last_saved != global_step and accelerator.is_main_process:
        save_adapter_checkpoint(output_dir / f"checkpoint-{global_step}", model)
    progress.close()
    accelerator.end_training()
    accelerator.print(
        f"adapter checkpoints: {output_dir.resolve()}/checkpoint-*/model.bin, TensorBoard logs: {output_dir.resolve() / args.logging_dir}"
    )


if __name__ == "__main__":
    main()
