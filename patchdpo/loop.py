"""The PatchDPO training loop: set-up, the optimizer-step loop (accumulation, logging, validation) and saving.

`patchdpo.run.run_training` puts the robustness around it (launch checks, folder lock, where a resume
starts, stop signals); the method itself is `patchdpo.method`. An optimizer step trains
`train_batch_size x processes x gradient_accumulation_steps` pairs; every random draw of a pair is
keyed on (seed, epoch, dataset index), so any layout of the same global batch trains the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import release_memory, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from base_models import family_of
from common.checkpoints import (
    prune_training_states,
    remove_earlier_run,
    remove_orphan_checkpoint_files,
)
from common.distributed import SHARED_STORAGE_FIX, require_agreement
from common.errors import BadInputError
from common.io import reporting_write_errors, sha256_file
from common.precision import mixed_precision_dtype
from common.sampling import EpochSampler
from common.stop_signals import StopSignals, ignore_stop_signals_in_worker
from common.training_state import CheckedState, Resumable, load_training_state, save_training_state
from ip_adapter.speed import apply_speed_settings
from patch_quality.store import QualityMaps
from patchdpo.config import TrainingConfig
from patchdpo.feature_cache import CachedEncoderOutputs, FeatureCache, build_feature_cache, cache_key
from patchdpo.method import EncodedPairs, LossOutput, Method, training_step
from patchdpo.models import (
    FrozenEncoders,
    IPAdapterTrainingModel,
    TrainingModels,
    adapter_weights,
    frozen_adapter_copy,
    load_training_models,
    save_adapter_checkpoint,
)
from patchdpo.optimization import StepPlan, adamw, check_8bit_adam, lr_scheduler, require_one_step
from patchdpo.pair_dataset import DropoutRates, EncoderInputs, EncoderPayload, PairDataset, TrainingPair, index_pairs
from patchdpo.resume import TRACKER_PROJECT, check_steps_left, tracker_logs
from patchdpo.run_settings import apply_changed_settings, check_resume_settings, run_settings
from patchdpo.sharding import (
    GatheredOptimizer,
    full_state_dict,
    full_value,
    gradient_sync,
    load_full_state_dict,
    shard_frozen_base,
    swapped_weights,
)
from patchdpo.step_guard import StepGuard
from patchdpo.step_metrics import StepMeter
from patchdpo.validate_inputs import check_inputs_on_every_process

logger = get_logger(__name__)


class Validation(Protocol):
    """Sampling with the current adapter during training (`dreambench.validation.TrainingValidation`)."""

    def due(self, step: int) -> bool: ...

    def __call__(self, step: int, adapter_modules: torch.nn.Module) -> None: ...


#: Builds the validation hook from (accelerator, seed, the run's TrainingModels); the script passes it, so this
#: package needs no dreambench.
ValidationFactory = Callable[[Accelerator, int, TrainingModels], Validation]


@dataclass
class TrainingRun:
    """Everything the loop reads, built by `set_up`; `global_step` counts optimizer steps."""

    config: TrainingConfig
    accelerator: Accelerator
    models: TrainingModels
    prepared_model: torch.nn.Module  # models.model as accelerate prepared it (possibly DDP-wrapped): what the step calls
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    resumable: Resumable  # what a training state saves and restores (common.training_state)
    loader: DataLoader
    plan: StepPlan
    method: Method
    encoders: FrozenEncoders  # the frozen encoders the step still runs (with --cache_dir: at most the image encoder)
    guard: StepGuard
    settings: dict  # recorded with every training state and compared on resume (patchdpo.run_settings)
    validation: Validation | None
    gathered: Gathered | None = None  # `--shard_base`: the adapter is gathered on every process before a save
    global_step: int = 0
    last_saved: int | None = None
    grad_norm: torch.Tensor | None = None  # before clipping, at the last optimizer step
    stop_requested: bool = False  # some process received a stop signal: save and leave after this step

    def checkpoint_dir(self) -> Path:
        return Path(self.config.output_dir) / f"checkpoint-{self.global_step}"

    def micro_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This process's micro-batches from where `global_step` stands, epoch after epoch."""
        if self.global_step >= self.plan.total_steps:
            return
        first_epoch, skip = self.plan.position(self.global_step)
        for epoch in range(first_epoch, self.config.num_train_epochs):
            self.loader.set_epoch(epoch)
            yield from self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
            skip = 0


def pairs_per_step(config: TrainingConfig, accelerator: Accelerator) -> int:
    """The global batch: micro-batch x processes x accumulated micro-batches."""
    return config.train_batch_size * accelerator.num_processes * accelerator.gradient_accumulation_steps


@dataclass
class TrainingData:
    """The checked pairs of `--data_root_path` with their quality maps (None unless --loss patch_dpo), on the family's latent grid."""

    pairs: list[TrainingPair]
    quality_maps: QualityMaps | None
    maps_sha256: str | None  # hashed once per start: checked inputs and run settings
    latent_size: int
    dropout: DropoutRates


def load_models(config: TrainingConfig, accelerator: Accelerator) -> TrainingModels:
    """The base-model family (read from the folder's model_index.json) and its models, placed as training holds them."""
    weight_dtype = mixed_precision_dtype(accelerator.mixed_precision)
    family = family_of(
        config.pretrained_model_name_or_path,
        revision=config.revision,
        official_time_ids=config.official_time_ids,
        flow_matching=config.flow_matching(),
    )
    if config.validation_data_root is not None:
        family.ip_adapter_class()  # a family that cannot sample yet refuses validation before anything loads
    time_ids = " (the reference training's time ids)" if config.official_time_ids else ""
    logger.info(f"{family.name} + IP-Adapter, loss={config.loss}{time_ids}", main_process_only=True)
    return load_training_models(
        config.pretrained_model_name_or_path,
        config.image_encoder_path,
        config.pretrained_ip_adapter_path,
        accelerator.device,
        weight_dtype,
        revision=config.revision,
        variant=config.variant,
        unet_dtype=torch.float32 if config.fp32_unet else weight_dtype,
        family=family,
    )


def load_data(config: TrainingConfig, accelerator: Accelerator, models: TrainingModels) -> TrainingData:
    """Index and check every pair (split over the processes) before anything is built from them."""
    dropout = DropoutRates(config.image_drop_rate, config.text_drop_rate, config.both_drop_rate)
    factor = models.family.latent_scale(models.encoders.vae.config)
    if config.resolution % factor:
        raise BadInputError(f"--resolution {config.resolution} is not a multiple of the VAE's downsampling factor {factor}")
    latent_size = config.resolution // factor
    quality_maps = QualityMaps.load(config.patch_quality_file) if config.loss == "patch_dpo" else None
    pairs = index_pairs(config.data_root_path, quality_maps, config.generated_per_sample, latent_size)
    require_one_step(len(pairs), config.train_batch_size, accelerator.num_processes, accelerator.gradient_accumulation_steps)
    maps_sha256 = sha256_file(quality_maps.path) if quality_maps is not None else None
    check_inputs_on_every_process(accelerator, pairs, quality_maps, maps_sha256, config.output_dir, config.dataloader_num_workers)
    return TrainingData(pairs, quality_maps, maps_sha256, latent_size, dropout)


def data_loader(config: TrainingConfig, accelerator: Accelerator, data: TrainingData, source: EncoderPayload) -> DataLoader:
    """This process's micro-batches, each pair's draws keyed on (seed, epoch, index)."""
    dataset = PairDataset(data.pairs, data.latent_size, config.seed, source, data.quality_maps, data.dropout)
    return DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        sampler=EpochSampler(len(dataset), config.seed, pairs_per_step(config, accelerator)),
        num_workers=config.dataloader_num_workers,
        worker_init_fn=ignore_stop_signals_in_worker,
    )


def set_up(
    config: TrainingConfig, accelerator: Accelerator, resume: CheckedState | None, make_validation: ValidationFactory | None = None
) -> TrainingRun:
    """Load the models and data, build the cache, optimizer and schedule, prepare them, resume from `resume` (`resolve_start`)."""
    set_seed(config.seed)
    if config.use_8bit_adam:
        check_8bit_adam(accelerator.device)
    models = load_models(config, accelerator)
    data = load_data(config, accelerator, models)
    if accelerator.is_main_process:
        remove_orphan_checkpoint_files(config.output_dir)
    source, step_encoders = pair_source(config, accelerator, models, data.pairs, models.model.compute_dtype)
    if step_encoders is not models.encoders and make_validation is None:  # validation samples with them; else they are done
        models.encoders = None
        release_memory()
    validation = make_validation(accelerator, config.seed, models) if make_validation is not None else None
    loader = data_loader(config, accelerator, data, source)
    model = models.model
    if config.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    apply_speed_settings(model.unet, compile=config.compile, allow_tf32=config.allow_tf32, announce=accelerator.print)
    prepared_model, optimizer, loader, reference_params, gathered = prepare_training(config, accelerator, model, loader)
    plan = StepPlan.create(len(loader), accelerator.gradient_accumulation_steps, config.stop_step, config.num_train_epochs)
    check_steps_left(config, plan, resume)
    announce_plan(config, accelerator, plan, len(data.pairs), resume.step if resume else 0)
    scheduler = lr_scheduler(config.lr_scheduler, optimizer, config.lr_warmup_steps, plan.total_steps)
    reference_forward = None
    if reference_params is not None:
        reference_forward = frozen_forward(accelerator, prepared_model, reference_params, sharded=gathered is not None)
    method = Method(config.loss, models.objective, config.resolution, config.noise_offset, config.dpo_beta, reference_forward)
    per_step = pairs_per_step(config, accelerator)
    settings = run_settings(
        config, data.pairs, per_step, accelerator.mixed_precision, plan.total_steps, data.maps_sha256, models.family.objective_settings()
    )
    if gathered is None:
        resumable = Resumable(adapter_weights(model), optimizer, scheduler, accelerator.scaler)
    else:  # the files of an unsharded run, from what every process gathered before the main one writes
        weights = adapter_weights(model, lambda: gathered.trained, load_full_state_dict)
        resumable = Resumable(weights, gathered.optimizer, scheduler, accelerator.scaler)
    guard = StepGuard(accelerator, data.pairs)
    run = TrainingRun(
        config, accelerator, models, prepared_model, optimizer, scheduler, resumable, loader, plan, method, step_encoders, guard, settings, validation, gathered
    )  # fmt: skip
    if resume is not None:
        resume_run(run, resume)
    if config.overwrite_output_dir and accelerator.is_main_process:  # last: a refused start above loses nothing
        remove_earlier_run(config.output_dir, [tracker_logs(config)])
    accelerator.wait_for_everyone()
    return run


@dataclass
class Gathered:
    """A sharded run's adapter and optimizer state, gathered on every process (a collective) before the main one writes them."""

    model: IPAdapterTrainingModel
    optimizer: GatheredOptimizer
    trained: dict[str, torch.Tensor] | None = None

    def gather(self) -> dict[str, torch.Tensor]:
        self.trained = full_state_dict(self.model.adapter_modules)
        self.optimizer.gather()
        return self.trained


def prepare_training(
    config: TrainingConfig, accelerator: Accelerator, model: IPAdapterTrainingModel, loader: DataLoader
) -> tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader, dict | None, Gathered | None]:
    """(the model the step calls, optimizer, loader, image_dpo's frozen adapter copy, a sharded run's `Gathered`).

    `--shard_base` shards the frozen denoiser over the processes (`patchdpo.sharding`: FSDP2, directly, not
    through `accelerator.prepare`, which would wrap it in DDP); the optimizer then steps the adapter's shards.
    """
    if config.shard_base:
        if accelerator.num_processes < 2:
            raise BadInputError("--shard_base shards the frozen base over the processes; this run has one: drop the flag")
        shard_frozen_base(model.unet)
    reference_params = frozen_adapter_copy(model) if config.loss == "image_dpo" else None  # as loaded (a sharded run: its shards)
    optimizer = adamw(
        model.adapter_modules.parameters(), config.learning_rate, config.weight_decay, config.fused_adamw, config.use_8bit_adam
    )
    if not config.shard_base:
        prepared_model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        return prepared_model, optimizer, loader, reference_params, None
    optimizer, loader = accelerator.prepare(optimizer, loader)
    return model, optimizer, loader, reference_params, Gathered(model, GatheredOptimizer(optimizer))


def resume_run(run: TrainingRun, resume: CheckedState) -> None:
    """Restore the checked state into `run` once its settings agree with the recorded ones (or were allowed to change)."""
    config = run.config
    changed = check_resume_settings(resume.state_dir, run.settings, config.change_on_resume)
    run.global_step = load_training_state(resume, run.resumable)
    run.lr_scheduler = apply_changed_settings(changed, config, run.optimizer, run.lr_scheduler, run.plan.total_steps)
    run.resumable = replace(run.resumable, scheduler=run.lr_scheduler)
    logger.info(f"resumed from {resume.directory} at step {run.global_step}" + (f", changing {', '.join(changed)}" if changed else ""))


def frozen_forward(
    accelerator: Accelerator, model: torch.nn.Module, params: dict[str, torch.Tensor], sharded: bool = False
) -> Callable[[tuple], torch.Tensor]:
    """The training model's forward with the frozen initial adapter `params`: image_dpo's reference policy.

    A sharded model ignores parameters swapped on its modules, so its shards are swapped instead (`swapped_weights`)."""

    def forward(inputs: tuple) -> torch.Tensor:
        if sharded:
            with accelerator.autocast(), swapped_weights(model, params):
                return model(*inputs)
        with accelerator.autocast():
            return torch.func.functional_call(accelerator.unwrap_model(model), params, inputs)

    return forward


def announce_plan(config: TrainingConfig, accelerator: Accelerator, plan: StepPlan, num_pairs: int, resumed_after: int = 0) -> None:
    """Say how many optimizer steps will run and why (and from where, on resume), and when a given flag will be ignored."""
    per_step = pairs_per_step(config, accelerator)
    epoch_cap = config.num_train_epochs * plan.steps_per_epoch
    epochs_needed = -(-config.stop_step // plan.steps_per_epoch)
    why = (
        f"--stop_step {config.stop_step}"
        if plan.total_steps == config.stop_step
        else f"the epoch cap: --num_train_epochs {config.num_train_epochs} x {plan.steps_per_epoch} steps per epoch "
        f"({num_pairs} pairs // {per_step} pairs per step) = {epoch_cap} < --stop_step {config.stop_step}; the last checkpoint "
        f"is checkpoint-{plan.total_steps}, pass --num_train_epochs {epochs_needed} to reach --stop_step"
    )
    resuming = f", resuming after step {resumed_after}: {plan.total_steps - resumed_after} to go" if resumed_after else ""
    accelerator.print(f"training {plan.total_steps} optimizer steps of {per_step} pairs ({why}){resuming}")
    if config.patch_quality_file is not None and config.loss != "patch_dpo":
        logger.warning(
            f"--patch_quality_file is ignored: --loss {config.loss} does not use quality maps (pass --use_dpo_loss True for PatchDPO)",
            main_process_only=True,
        )


def pair_source(
    config: TrainingConfig, accelerator: Accelerator, models: TrainingModels, pairs: list, weight_dtype: torch.dtype
) -> tuple[EncoderPayload, FrozenEncoders]:
    """What items carry and which encoders the step runs: pixels for all of them, or (`--cache_dir`) their outputs,
    built once and shared, with per-step CLIP pixels where a non-square reference's crop is random."""
    if config.cache_dir is None:
        return EncoderInputs(config.resolution, models.family, models.encoders.tokenizers), models.encoders
    key = cache_key(config.resolution, config.pretrained_model_name_or_path, config.image_encoder_path, weight_dtype)
    cache = FeatureCache.for_key(config.cache_dir, key, models.family.prompt_fields)
    build_feature_cache(
        cache,
        pairs,
        models.encoders,
        config.resolution,
        accelerator.process_index,
        accelerator.num_processes,
        show_progress=accelerator.is_local_main_process,
    )
    accelerator.wait_for_everyone()
    require_agreement(
        accelerator,
        cache.missing_files(pairs),
        lambda seen: (
            f"--cache_dir {config.cache_dir}: some processes do not see the cache files the others wrote "
            f"({', '.join(f'process {rank}: {len(files)} missing' for rank, files in enumerate(seen))}): {SHARED_STORAGE_FIX}"
        ),
    )
    clip_per_step = cache.needs_clip_per_step(pairs)
    return CachedEncoderOutputs(cache, clip_per_step), models.encoders.kept_with_cache(clip_per_step)


def train(run: TrainingRun, signals: StopSignals) -> bool:
    """Optimizer steps until `plan.total_steps`: accumulate micro-batches, step, log, save; True if stopped by a signal."""
    accelerator, config = run.accelerator, run.config
    hparams = config.hyperparameters()
    with reporting_write_errors(Path(config.output_dir) / config.logging_dir):
        accelerator.init_trackers(TRACKER_PROJECT, config=hparams)
    progress = tqdm(
        total=run.plan.total_steps, initial=run.global_step, desc="optimizer steps", disable=not accelerator.is_local_main_process
    )
    meter = StepMeter(pairs_per_step(config, accelerator))
    if run.validation:
        run.validation(run.global_step, run.models.model.adapter_modules)  # the adapter this run starts from
    for batch in run.micro_batches():
        meter.add(micro_step(run, batch, signals))
        if not accelerator.sync_gradients:
            continue
        run.global_step += 1
        progress.update(1)
        means = meter.end_step()
        if run.global_step % config.logging_steps == 0 or run.global_step == run.plan.total_steps:
            log_step(run, meter.logs(accelerator, means), progress)
        save_checkpoints(run)
        if run.stop_requested:
            break
        if run.validation and run.validation.due(run.global_step):
            run.validation(run.global_step, run.models.model.adapter_modules)
        if run.global_step >= run.plan.total_steps:
            break
    progress.close()
    return run.stop_requested


def micro_step(run: TrainingRun, batch: dict[str, torch.Tensor], signals: StopSignals) -> LossOutput:
    """Forward and backward on one micro-batch; on the last of an optimizer step also agree, clip and step."""
    accelerator, config = run.accelerator, run.config
    sharded = run.gathered is not None
    with accelerator.accumulate(run.prepared_model):
        with accelerator.autocast() if sharded else contextlib.nullcontext():  # prepare() puts an unsharded model under autocast
            output = training_step(run.prepared_model, EncodedPairs.from_batch(batch, run.encoders), run.method)
        with gradient_sync(run.models.model.unet, accelerator.sync_gradients) if sharded else contextlib.nullcontext():
            accelerator.backward(output.loss)
        run.guard.watch(output.loss, batch)
        if accelerator.sync_gradients:
            # clipping's norm (an infinite maximum when clipping is off) is what the guard checks: one pass, one collective
            max_norm = config.max_grad_norm if config.max_grad_norm is not None else float("inf")
            run.grad_norm = full_value(accelerator.clip_grad_norm_(run.models.model.adapter_modules.parameters(), max_norm))
            run.stop_requested = run.guard.agree(run.grad_norm, run.global_step + 1, signals.received is not None)
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
    """`checkpoint-N/model.bin` every `--save_steps`, the training state every `--checkpointing_steps`; both when stopped by a signal."""
    config, accelerator, step = run.config, run.accelerator, run.global_step
    adapter_due = step % config.save_steps == 0 or step == run.plan.total_steps or run.stop_requested
    state_due = (config.checkpointing_steps and step % config.checkpointing_steps == 0) or run.stop_requested
    if run.gathered is not None and (adapter_due or state_due):
        run.gathered.gather()
    if adapter_due:
        if accelerator.is_main_process:
            save_adapter_checkpoint(run.checkpoint_dir(), run.models.model, run.gathered and run.gathered.trained)
        run.last_saved = step
    if state_due:
        save_training_state(accelerator, run.checkpoint_dir(), run.resumable, step, run.settings)
        if config.checkpoints_total_limit and accelerator.is_main_process:
            prune_training_states(config.output_dir, config.checkpoints_total_limit)
