"""PatchDPO training: finetune IP-Adapter-Plus (SDXL) on (reference, generated) pairs.

    accelerate launch --num_processes 8 --multi_gpu --mixed_precision fp16 train_patchdpo.py \
      --pretrained_model_name_or_path SDXL_DIR --image_encoder_path ENC_DIR \
      --pretrained_ip_adapter_path ip-adapter-plus_sdxl_vit-h.bin --data_root_path DATA \
      --patch_quality_file DATA/patch_quality.safetensors --resolution 512 --train_batch_size 4 \
      --dataloader_num_workers 4 --learning_rate 3e-05 --weight_decay 0.01 --save_steps 10000 \
      --stop_step 30000 --output_dir output/exp1/ --use_dpo_loss True

Flags and defaults follow the official script; the step itself lives in `patchdpo.training`,
the objectives in `patchdpo.loss`, the step arithmetic and optimizer in `patchdpo.optimization`.
Any layout of processes x `--train_batch_size` x `--gradient_accumulation_steps` with the same
product trains the same global batches with the same randomness (README "Training").
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, release_memory, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from common.checks import require_flags_in_range
from common.cli import exit_on_bad_input, str2bool
from common.errors import BadInputError
from common.launch import check_launch, check_mixed_precision
from common.precision import mixed_precision_dtype
from common.sampling import EpochSampler
from common.training_state import (
    TRAINING_STATE_DIR,
    checkpoint_step,
    find_resume_checkpoint,
    prune_training_states,
    remove_orphan_checkpoint_files,
    save_training_state,
)
from ip_adapter.loading import vae_scale_factor
from ip_adapter.speed import add_speed_args, apply_speed_args
from patch_quality.store import QualityMaps
from patchdpo.feature_cache import FeatureCache, build_feature_cache, cache_key
from patchdpo.finite_guard import check_step_is_finite
from patchdpo.loss import LOSS_MODES, LossOutput
from patchdpo.optimization import LR_SCHEDULERS, StepPlan, adamw, lr_scheduler
from patchdpo.pair_dataset import DropoutRates, PairDataset, TrainingPair, index_pairs
from patchdpo.step_metrics import StepMeter
from patchdpo.training import (
    PairConditioning,
    TrainingModels,
    frozen_adapter_copy,
    load_training_models,
    register_adapter_state_hooks,
    save_adapter_checkpoint,
    training_step,
)
from patchdpo.validate_inputs import check_training_args, validate_training_inputs

PROG = "train_patchdpo.py"
logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    official = parser.add_argument_group("official flags (train_patchdpo.py of hqhQAQ/PatchDPO)")
    official.add_argument("--pretrained_model_name_or_path", required=True, help="local SDXL pipeline folder")
    official.add_argument(
        "--pretrained_ip_adapter_path",
        default=None,
        help="IP-Adapter-Plus checkpoint to start from; absent: adapter from to_k/to_v, fresh Resampler",
    )
    official.add_argument("--data_root_path", required=True, help="folder of sample{i}/ pairs")
    official.add_argument("--image_encoder_path", required=True, help="local CLIP vision model folder")
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
    official.add_argument("--report_to", default="tensorboard")
    official.add_argument("--local_rank", type=int, default=-1, help="ignored: accelerate sets the rank")
    official.add_argument("--patch_quality_file", default=None, help="quality maps (needed by --loss patch_dpo)")
    official.add_argument(
        "--use_dpo_loss", type=str2bool, default=None, help="official switch: True = --loss patch_dpo, False (default) = --loss mse"
    )

    extra = parser.add_argument_group("beyond the official script")
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
    extra.add_argument("--fused_adamw", action="store_true", help="fused AdamW kernel (the same update; faster on CUDA)")
    add_speed_args(extra)
    args = parser.parse_args(argv)

    loss_from_switch = None if args.use_dpo_loss is None else ("patch_dpo" if args.use_dpo_loss else "mse")
    if args.loss is not None and loss_from_switch is not None and args.loss != loss_from_switch:
        parser.error(f"--loss {args.loss} contradicts --use_dpo_loss {args.use_dpo_loss} (which means --loss {loss_from_switch})")
    args.loss = args.loss or loss_from_switch or "mse"
    if args.loss == "patch_dpo" and args.patch_quality_file is None:
        parser.error("--loss patch_dpo (--use_dpo_loss True) needs --patch_quality_file")
    positive = ("train_batch_size", "stop_step", "save_steps", "generated_per_sample", "logging_steps", "checkpointing_steps")
    try:
        require_flags_in_range(args, (*positive, "gradient_accumulation_steps", "checkpoints_total_limit"), minimum=1)
    except BadInputError as error:
        parser.error(str(error))
    if args.max_grad_norm is not None and args.max_grad_norm <= 0:
        parser.error(f"--max_grad_norm must be > 0, got {args.max_grad_norm}")
    if args.lr_warmup_steps < 0 or (args.lr_warmup_steps and args.lr_scheduler in ("constant", "piecewise_constant")):
        parser.error(
            f"--lr_warmup_steps {args.lr_warmup_steps} needs a schedule with warmup (e.g. constant_with_warmup), not {args.lr_scheduler}"
        )
    return args


@exit_on_bad_input(PROG)
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_training_args(args)
    accelerator = create_accelerator(args)
    check_launch(accelerator.num_processes, PROG)
    check_mixed_precision(accelerator.mixed_precision, accelerator.device.type)
    run = set_up(args, accelerator)
    train(run)
    if run.last_saved != run.global_step and accelerator.is_main_process:
        save_adapter_checkpoint(run.checkpoint_dir(), run.models.model)
    accelerator.end_training()


@dataclass
class TrainingRun:
    """Everything the loop reads, built by `set_up`; `global_step` counts optimizer steps."""

    args: argparse.Namespace
    accelerator: Accelerator
    models: TrainingModels
    model: torch.nn.Module  # the prepared (possibly DDP-wrapped) models.model
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: DataLoader
    plan: StepPlan
    reference_params: dict[str, torch.Tensor] | None
    cached: bool
    pairs: list[TrainingPair]  # the dataset's pairs, to name the samples of a batch that goes non-finite
    global_step: int = 0
    last_saved: int | None = None
    grad_norm: torch.Tensor | None = None  # before clipping, at the last optimizer step (with --max_grad_norm)

    def checkpoint_dir(self) -> Path:
        return Path(self.args.output_dir) / f"checkpoint-{self.global_step}"

    def micro_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This process's micro-batches from where `global_step` stands, epoch after epoch."""
        if self.global_step >= self.plan.total_steps:
            return
        first_epoch, skip = self.plan.position(self.global_step)
        for epoch in range(first_epoch, self.args.num_train_epochs):
            self.loader.set_epoch(epoch)
            yield from self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
            skip = 0


def create_accelerator(args: argparse.Namespace) -> Accelerator:
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return accelerator


def pairs_per_step(args: argparse.Namespace, accelerator: Accelerator) -> int:
    """The global batch: micro-batch x processes x accumulated micro-batches."""
    return args.train_batch_size * accelerator.num_processes * accelerator.gradient_accumulation_steps


def set_up(args: argparse.Namespace, accelerator: Accelerator) -> TrainingRun:
    """Load the models and data, build the cache, optimizer and schedule, prepare them, resume."""
    logger.info(f"loss={args.loss} time_ids={'official' if args.official_time_ids else 'per-image'}", main_process_only=True)
    set_seed(args.seed)
    weight_dtype = mixed_precision_dtype(accelerator.mixed_precision)
    models = load_training_models(
        args.pretrained_model_name_or_path, args.image_encoder_path, args.pretrained_ip_adapter_path, accelerator.device, weight_dtype
    )
    factor = vae_scale_factor(models.encoders.vae.config)
    if args.resolution % factor:
        raise BadInputError(f"--resolution {args.resolution} is not a multiple of the VAE's downsampling factor {factor}")
    latent_size = args.resolution // factor
    quality_maps = QualityMaps.load(args.patch_quality_file) if args.loss == "patch_dpo" else None
    pairs = index_pairs(args.data_root_path, quality_maps, args.generated_per_sample, latent_size)
    validate_training_inputs(pairs, quality_maps, show_progress=accelerator.is_local_main_process)
    dropout = DropoutRates(args.image_drop_rate, args.text_drop_rate, args.both_drop_rate)
    resume_dir = find_resume_checkpoint(args.output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    if accelerator.is_main_process:
        remove_orphan_checkpoint_files(args.output_dir)
    tokenizers, cache = models.encoders.tokenizers, None
    if args.cache_dir is not None:
        key = cache_key(args.resolution, args.pretrained_model_name_or_path, args.image_encoder_path, weight_dtype)
        cache = FeatureCache.for_key(args.cache_dir, key)
        build_feature_cache(
            cache,
            pairs,
            models.encoders,
            args.resolution,
            accelerator.process_index,
            accelerator.num_processes,
            show_progress=accelerator.is_local_main_process,
        )
        accelerator.wait_for_everyone()
        models.encoders = None  # the frozen encoders are not needed any more: free their memory
        release_memory()

    dataset = PairDataset(pairs, args.resolution, latent_size, args.seed, tokenizers, quality_maps, dropout, cache)
    sampler = EpochSampler(len(dataset), args.seed, pairs_per_step(args, accelerator))
    loader = DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler, num_workers=args.dataloader_num_workers)
    model = models.model
    if args.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    apply_speed_args(args, model.unet, accelerator.print)
    reference_params = frozen_adapter_copy(model) if args.loss == "image_dpo" else None
    optimizer = adamw(model.adapter_modules.parameters(), args.learning_rate, args.weight_decay, args.fused_adamw)
    register_adapter_state_hooks(accelerator, model)
    prepared_model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    plan = StepPlan.create(len(loader), accelerator.gradient_accumulation_steps, args.stop_step, args.num_train_epochs)
    scheduler = lr_scheduler(args.lr_scheduler, optimizer, args.lr_warmup_steps, plan.total_steps)
    accelerator.register_for_checkpointing(scheduler)
    run = TrainingRun(
        args, accelerator, models, prepared_model, optimizer, scheduler, loader, plan, reference_params, cache is not None, pairs
    )
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir / TRAINING_STATE_DIR))
        run.global_step = checkpoint_step(resume_dir)
        logger.info(f"resumed from {resume_dir} at step {run.global_step}")
    elif args.resume_from_checkpoint:
        logger.info(f"no checkpoint with a training state in {args.output_dir}: starting from step 0")
    return run


def train(run: TrainingRun) -> None:
    """Optimizer steps until `plan.total_steps`: accumulate micro-batches, step, log, save."""
    accelerator, args = run.accelerator, run.args
    hparams = {name: value if isinstance(value, (int, float, str, bool)) else str(value) for name, value in vars(args).items()}
    accelerator.init_trackers("patchdpo", config=hparams)
    progress = tqdm(
        total=run.plan.total_steps, initial=run.global_step, desc="optimizer steps", disable=not accelerator.is_local_main_process
    )
    meter = StepMeter(pairs_per_step(args, accelerator))
    for batch in run.micro_batches():
        meter.add(micro_step(run, batch))
        if not accelerator.sync_gradients:
            continue
        run.global_step += 1
        progress.update(1)
        means = meter.end_step()
        if run.global_step % args.logging_steps == 0 or run.global_step == run.plan.total_steps:
            log_step(run, meter.logs(accelerator, means), progress)
        save_checkpoints(run)
        if run.global_step >= run.plan.total_steps:
            break
    progress.close()


def micro_step(run: TrainingRun, batch: dict[str, torch.Tensor]) -> LossOutput:
    """Forward and backward on one micro-batch; on the last of an optimizer step also clip and step."""
    accelerator, args = run.accelerator, run.args
    with accelerator.accumulate(run.model):
        cond = PairConditioning.from_cached_batch(batch) if run.cached else PairConditioning.encode(run.models.encoders, batch)
        output = training_step(
            accelerator,
            run.model,
            cond,
            run.models.scheduler,
            loss_mode=args.loss,
            resolution=args.resolution,
            official_time_ids=args.official_time_ids,
            noise_offset=args.noise_offset,
            reference_params=run.reference_params,
            dpo_beta=args.dpo_beta,
        )
        accelerator.backward(output.loss)
        check_step_is_finite(accelerator, output.loss, run.models.model.adapter_modules.parameters(), run.global_step + 1, batch, run.pairs)
        if accelerator.sync_gradients and args.max_grad_norm is not None:
            run.grad_norm = accelerator.clip_grad_norm_(run.models.model.adapter_modules.parameters(), args.max_grad_norm)
        run.optimizer.step()
        if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
            run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return output


def log_step(run: TrainingRun, logs: dict[str, float], progress: tqdm) -> None:
    logs["lr"] = run.lr_scheduler.get_last_lr()[0]
    if run.grad_norm is not None:
        logs["grad_norm"] = run.grad_norm.item()
    run.accelerator.log(logs, step=run.global_step)
    progress.set_postfix(loss=f"{logs['loss']:.4g}", pairs_per_s=f"{logs['samples_per_s']:.2f}")


def save_checkpoints(run: TrainingRun) -> None:
    """`checkpoint-N/model.bin` every `--save_steps`, the training state every `--checkpointing_steps`."""
    args, accelerator, step = run.args, run.accelerator, run.global_step
    if step % args.save_steps == 0 or step == run.plan.total_steps:
        if accelerator.is_main_process:
            save_adapter_checkpoint(run.checkpoint_dir(), run.models.model)
        run.last_saved = step
    if args.checkpointing_steps and step % args.checkpointing_steps == 0:
        save_training_state(accelerator, run.checkpoint_dir())
        if args.checkpoints_total_limit and accelerator.is_main_process:
            prune_training_states(args.output_dir, args.checkpoints_total_limit)


if __name__ == "__main__":
    main()
