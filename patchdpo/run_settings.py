"""A resume is the same run: what a training state was trained with, recorded next to it and compared.

Resuming with another learning rate, schedule, global batch or dataset would train another run
than the one the state came from, silently (a new batch size or one more sample folder shifts which
pairs every later step trains). Each training state holds `settings.json`;
`--resume_from_checkpoint` refuses any difference in one line naming them, except the optimizer
settings the user lists in `--change_on_resume`, which then take their new value everywhere at
once: in the optimizer, the schedule and the logged hyper-parameters (`apply_changed_settings`).

What is recorded is an allow-list (`RecordedSettings`): the flags that change the updates, plus the
global batch, the data and the starting weights by content. Everything else is free to change
without a word: where things go and how often (paths, logging, saving, validation), speed switches
that cannot change the update, and the run's length (`--stop_step`, `--num_train_epochs`) as long
as the schedule does not depend on it. The layout of the global batch may change (1 GPU x 8
accumulated = 8 GPUs x 1), its size may not. A new flag is free until it is added here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from common.errors import BadInputError
from common.flags import CHANGEABLE_ON_RESUME
from common.hub import recorded_name
from common.io import sha256_file
from common.recorded_settings import read_recorded
from common.training_state import SETTINGS_NAME

from .config import TrainingConfig
from .optimization import lr_scheduler
from .pair_dataset import TrainingPair

_CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")
#: A recorded key that only an allowed flag may change: the schedule's length is part of `--lr_scheduler`'s shape.
_CHANGED_BY = {"schedule_total_steps": "lr_scheduler"}


def _pairs_digest(pairs: Sequence[TrainingPair]) -> str:
    listing = "\n".join(f"{p.sample}\t{p.generated_index}\t{p.prompt}\t{p.reference_path.name}\t{p.generated_path.name}" for p in pairs)
    return hashlib.sha256(listing.encode()).hexdigest()


@dataclass(frozen=True)
class RecordedSettings:
    """What decides a run's updates, recorded with every training state and compared on resume (an allow-list)."""

    # the models, by name (local folders: their absolute path) and the starting adapter by content
    pretrained_model_name_or_path: str
    revision: str | None
    variant: str | None
    image_encoder_path: str
    pretrained_ip_adapter_sha256: str | None
    # the data, by content, and what is drawn from it
    num_pairs: int
    pairs_sha256: str
    quality_maps_sha256: str | None
    generated_per_sample: int
    resolution: int
    seed: int
    image_drop_rate: float
    text_drop_rate: float
    both_drop_rate: float
    # the objective
    loss: str
    dpo_beta: float
    noise_offset: float | None
    official_time_ids: bool
    objective: dict | None  # the family's objective settings beyond these (FLUX's flow matching); None: not recorded
    # the update
    pairs_per_step: int
    learning_rate: float
    weight_decay: float
    lr_scheduler: str
    lr_warmup_steps: int
    max_grad_norm: float | None
    use_8bit_adam: bool
    mixed_precision: str
    fp32_unet: bool
    schedule_total_steps: int | None  # a decaying schedule's shape depends on the run's length; None for constant ones

    def as_recorded(self) -> dict[str, Any]:
        unset = ("schedule_total_steps", "objective")
        settings = {name: value for name, value in asdict(self).items() if not (name in unset and value is None)}
        return dict(sorted(settings.items()))


#: The fields read from the flag of the same name.
_FROM_FLAGS = tuple(
    name
    for name in RecordedSettings.__dataclass_fields__
    if name
    not in {
        "pretrained_ip_adapter_sha256",
        "num_pairs",
        "pairs_sha256",
        "quality_maps_sha256",
        "pairs_per_step",
        "mixed_precision",
        "schedule_total_steps",
        "objective",
    }
)


def run_settings(
    config: TrainingConfig,
    pairs: Sequence[TrainingPair],
    pairs_per_step: int,
    mixed_precision: str,
    total_steps: int,
    quality_maps_sha256: str | None,
    objective: dict | None = None,
) -> dict[str, Any]:
    """This run's `RecordedSettings`, as recorded in `settings.json`.

    `quality_maps_sha256`: the digest of the maps file the run reads (None without one), hashed once per start by the caller;
    `objective`: the family's `objective_settings()` (FLUX's timestep density and guidance).
    """
    flags = {name: getattr(config, name) for name in _FROM_FLAGS}
    for name in ("pretrained_model_name_or_path", "image_encoder_path"):
        flags[name] = recorded_name(flags[name])
    ip_adapter = config.pretrained_ip_adapter_path
    settings = RecordedSettings(
        **flags,
        pretrained_ip_adapter_sha256=sha256_file(ip_adapter) if ip_adapter and Path(ip_adapter).is_file() else ip_adapter,
        num_pairs=len(pairs),
        pairs_sha256=_pairs_digest(pairs),
        quality_maps_sha256=quality_maps_sha256,
        pairs_per_step=pairs_per_step,
        mixed_precision=mixed_precision,
        schedule_total_steps=None if config.lr_scheduler in _CONSTANT_SCHEDULES else total_steps,
        objective=objective,
    )
    return json.loads(json.dumps(settings.as_recorded(), default=str))  # as recorded: tuples become lists, paths strings


def check_resume_settings(state_dir: str | os.PathLike, now: Mapping[str, Any], allowed: Iterable[str]) -> list[str]:
    """The settings that differ from the state's and were allowed to (`--change_on_resume`); any other difference is an error."""
    path = Path(state_dir) / SETTINGS_NAME
    recorded = read_recorded(path, "training settings")
    if recorded is None:
        raise BadInputError(f"{path}: missing; without it this resume cannot be checked to continue the same run")
    # a key this version does not record (one an older version recorded, such as `clip_model`) is free to change
    compared = now.keys() | (recorded.keys() & RecordedSettings.__dataclass_fields__.keys())
    differing = sorted(key for key in compared if recorded.get(key) != now.get(key))
    allowed = set(allowed) | {key for key, flag in _CHANGED_BY.items() if flag in allowed}
    refused = [key for key in differing if key not in allowed]
    if refused:
        listing = "; ".join(f"{key}: recorded {recorded.get(key)!r}, now {now.get(key)!r}" for key in refused)
        changeable = sorted({_CHANGED_BY.get(key, key) for key in refused} & set(CHANGEABLE_ON_RESUME))
        hint = f", or pass --change_on_resume {' '.join(changeable)} to change them deliberately" if changeable else ""
        raise BadInputError(
            f"cannot resume from {Path(state_dir).parent}: the run differs from the one that saved it ({listing}); "
            f"rerun with the recorded settings{hint}, or start a new --output_dir"
        )
    return differing


def apply_changed_settings(
    changed: Iterable[str],
    config: TrainingConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    total_steps: int,
) -> torch.optim.lr_scheduler.LRScheduler:
    """After the state is loaded: the optimizer takes the new weight decay, and a changed learning-rate setting gets a
    schedule rebuilt from the new flags at the restored step (`new lr x new lambda(step)`); returns the schedule to use."""
    changed = set(changed)
    if "weight_decay" in changed:
        for group in optimizer.param_groups:
            group["weight_decay"] = config.weight_decay
    if not changed & {"learning_rate", "lr_scheduler", "lr_warmup_steps"}:
        return scheduler
    for group in optimizer.param_groups:
        group["initial_lr"] = config.learning_rate  # what a schedule resumed at `last_epoch` starts from
    # The schedule's constructor takes one step: starting it one before the restored step lands it there.
    return lr_scheduler(config.lr_scheduler, optimizer, config.lr_warmup_steps, total_steps, last_epoch=scheduler.last_epoch - 1)
