"""The typed settings of train_patchdpo.py, built once from its flags, and every check of their values.

Each field is named after the flag it comes from, in the parser's order (`common.cli.parse_config`
checks both): an error about a setting names the flag to change, and the logged hyper-parameters
keep their order. `TrainingConfig.checked` is the one place a flag's value is checked, before
anything loads; what needs the models or the data (the resolution against the VAE, the images, the
maps) is checked where those load. Nothing here imports torch: `--help` and a bad flag answer at once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from common.checks import require_flags_in_range
from common.errors import BadInputError
from common.flags import FLOW_MATCHING_DEFAULTS, metric_models


@dataclass(frozen=True)
class TrainingConfig:
    """train_patchdpo.py: the models, the data, the objective, the update, the run's bookkeeping, and validation."""

    pretrained_model_name_or_path: str
    pretrained_ip_adapter_path: str | None
    data_root_path: str
    image_encoder_path: str
    output_dir: str
    logging_dir: str
    resolution: int
    learning_rate: float
    weight_decay: float
    num_train_epochs: int
    train_batch_size: int
    noise_offset: float | None
    dataloader_num_workers: int
    stop_step: int
    save_steps: int
    mixed_precision: str | None
    report_to: str
    local_rank: int
    patch_quality_file: str | None
    use_dpo_loss: bool | None
    revision: str | None
    variant: str | None
    loss: str | None  # None: from --use_dpo_loss (`checked` resolves it)
    dpo_beta: float
    official_time_ids: bool
    seed: int
    generated_per_sample: int
    image_drop_rate: float
    text_drop_rate: float
    both_drop_rate: float
    checkpointing_steps: int | None
    resume_from_checkpoint: str | None
    overwrite_output_dir: bool
    change_on_resume: list[str]
    cache_dir: str | None
    gradient_checkpointing: bool
    logging_steps: int
    gradient_accumulation_steps: int
    lr_scheduler: str
    lr_warmup_steps: int
    max_grad_norm: float | None
    checkpoints_total_limit: int | None
    fp32_unet: bool
    use_8bit_adam: bool
    shard_base: bool
    fused_adamw: bool
    compile: bool
    allow_tf32: bool
    ddp_timeout: float
    validation_data_root: Path | None
    validation_steps: int | None
    validation_subjects: list[str]
    validation_prompts: int
    validation_num_inference_steps: int
    validation_scale: float
    validation_size: int | None
    clip_model: str | None
    dino_model: str | None
    weighting_scheme: str | None  # the flow-matching flags: None when not given (a UNet family refuses any given)
    logit_mean: float | None
    logit_std: float | None
    mode_scale: float | None
    guidance_scale: float | None

    def checked(self) -> TrainingConfig:
        """Every flag's value checked (`BadInputError` naming the flag), with the loss and the metric models resolved."""
        loss = _resolved_loss(self.loss, self.use_dpo_loss)
        if loss == "patch_dpo" and self.patch_quality_file is None:
            raise BadInputError("--loss patch_dpo (--use_dpo_loss True) needs --patch_quality_file")
        self._check_ranges()
        self._check_combinations()
        validating = self.validation_data_root is not None
        if validating and self.pretrained_ip_adapter_path is None:
            raise BadInputError("--validation_data_root needs --pretrained_ip_adapter_path (its Resampler makes the image tokens)")
        clip_model, dino_model = metric_models(self.clip_model, self.dino_model) if validating else (self.clip_model, self.dino_model)
        return replace(self, loss=loss, clip_model=clip_model, dino_model=dino_model)

    def _check_ranges(self) -> None:
        positive = ("train_batch_size", "stop_step", "save_steps", "generated_per_sample", "logging_steps", "checkpointing_steps")
        more = ("gradient_accumulation_steps", "checkpoints_total_limit", "validation_steps", "validation_prompts")
        require_flags_in_range(self, (*positive, *more), minimum=1)
        require_flags_in_range(self, ("resolution", "num_train_epochs"), minimum=1)
        require_flags_in_range(self, ("dataloader_num_workers", "learning_rate", "weight_decay", "dpo_beta", "noise_offset"), minimum=0)
        require_flags_in_range(self, ("image_drop_rate", "text_drop_rate", "both_drop_rate"), minimum=0, maximum=1)
        if self.image_drop_rate + self.text_drop_rate + self.both_drop_rate > 1:
            raise BadInputError(
                f"dropout rates must be >= 0 and sum to <= 1, got image={self.image_drop_rate} text={self.text_drop_rate} "
                f"both={self.both_drop_rate}"
            )

    def _check_combinations(self) -> None:
        if self.overwrite_output_dir and self.resume_from_checkpoint:
            raise BadInputError("--overwrite_output_dir starts over, --resume_from_checkpoint continues: pass one of them")
        if self.shard_base and self.validation_data_root is not None:
            raise BadInputError(
                "--shard_base: validation samples on the main process alone, which a sharded base cannot: drop --validation_data_root"
            )
        if self.logit_std is not None and not self.logit_std > 0:
            raise BadInputError(f"--logit_std must be > 0, got {self.logit_std}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise BadInputError(f"--max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.lr_warmup_steps < 0 or (self.lr_warmup_steps and self.lr_scheduler in ("constant", "piecewise_constant")):
            raise BadInputError(
                f"--lr_warmup_steps {self.lr_warmup_steps} needs a schedule with warmup (e.g. constant_with_warmup), not {self.lr_scheduler}"
            )

    def flow_matching(self) -> dict[str, Any]:
        """The flow-matching flags given on the command line (unset ones absent; the family fills its defaults)."""
        return {name: getattr(self, name) for name in FLOW_MATCHING_DEFAULTS if getattr(self, name) is not None}

    def hyperparameters(self) -> dict[str, int | float | str | bool]:
        """Every setting as the trackers log it (numbers, strings and booleans as they are; anything else as its text)."""
        return {field.name: _loggable(getattr(self, field.name)) for field in fields(self)}


def _resolved_loss(loss: str | None, use_dpo_loss: bool | None) -> str:
    """`--loss`, else the official `--use_dpo_loss` switch's, else mse; the two disagreeing is an error."""
    from_switch = None if use_dpo_loss is None else ("patch_dpo" if use_dpo_loss else "mse")
    if loss is not None and from_switch is not None and loss != from_switch:
        raise BadInputError(f"--loss {loss} contradicts --use_dpo_loss {use_dpo_loss} (which means --loss {from_switch})")
    return loss or from_switch or "mse"


def _loggable(value: Any) -> int | float | str | bool:
    return value if isinstance(value, (int, float, str, bool)) else str(value)
