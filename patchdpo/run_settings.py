"""A resume is the same run: what a training state was trained with, recorded next to it and compared.

Resuming with another learning rate, schedule, global batch or dataset used to "work": the
optimizer kept the old learning rate while the new schedule's lambda applied, and a new batch
size or one more sample folder silently shifted which pairs every later step trains. Each
training state now holds `settings.json`; `--resume_from_checkpoint` refuses any difference in
one line naming them, except the optimizer settings the user lists in `--change_on_resume`, which
then take their new value everywhere at once: in the optimizer, the schedule and the logged
hyper-parameters (`apply_changed_settings`).

Free to change without a word: where things go and how often (paths, logging, saving, validation),
speed switches that cannot change the update, and the run's length (`--stop_step`,
`--num_train_epochs`) as long as the schedule does not depend on it. The layout of the global
batch may change (1 GPU x 8 accumulated = 8 GPUs x 1), its size may not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from common.errors import BadInputError
from common.flags import CHANGEABLE_ON_RESUME
from common.hub import recorded_name
from common.io import sha256_file
from common.recorded_settings import read_recorded
from common.training_state import SETTINGS_NAME

from .pair_dataset import TrainingPair

#: Flags that change neither what a step trains nor how: free on resume.
_FREE = {
    "output_dir",
    "logging_dir",
    "report_to",
    "local_rank",
    "resume_from_checkpoint",
    "overwrite_output_dir",
    "change_on_resume",
    "cache_dir",
    "dataloader_num_workers",
    "logging_steps",
    "save_steps",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "gradient_checkpointing",
    "fused_adamw",
    "compile",
    "allow_tf32",
    "stop_step",
    "num_train_epochs",
    "train_batch_size",  # its product with processes and accumulation is recorded as pairs_per_step
    "gradient_accumulation_steps",
    "ddp_timeout",
    "use_dpo_loss",  # recorded as `loss`
    "patch_quality_file",  # recorded by content: quality_maps_sha256
    "data_root_path",  # recorded by content: pairs_sha256
    "pretrained_ip_adapter_path",  # recorded by content
}
_CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")
#: A recorded key that only an allowed flag may change: the schedule's length is part of `--lr_scheduler`'s shape.
_CHANGED_BY = {"schedule_total_steps": "lr_scheduler"}


def _pairs_digest(pairs: Sequence[TrainingPair]) -> str:
    listing = "\n".join(f"{p.sample}\t{p.k}\t{p.prompt}\t{p.reference_path.name}\t{p.generated_path.name}" for p in pairs)
    return hashlib.sha256(listing.encode()).hexdigest()


def run_settings(
    args: argparse.Namespace,
    pairs: Sequence[TrainingPair],
    pairs_per_step: int,
    mixed_precision: str,
    total_steps: int,
    quality_maps_sha256: str | None,
) -> dict[str, Any]:
    """What decides this run's updates: its flags (less `_FREE`), the global batch, the data and starting weights by content.

    `quality_maps_sha256`: the digest of the maps file the run reads (None without one), hashed once per start by the caller.
    """
    settings = {name: value for name, value in sorted(vars(args).items()) if name not in _FREE and not name.startswith("validation")}
    for name in ("pretrained_model_name_or_path", "image_encoder_path"):
        settings[name] = recorded_name(settings[name])
    settings["mixed_precision"] = mixed_precision
    settings["pairs_per_step"] = pairs_per_step
    settings["num_pairs"] = len(pairs)
    settings["pairs_sha256"] = _pairs_digest(pairs)
    settings["quality_maps_sha256"] = quality_maps_sha256
    ip_adapter = args.pretrained_ip_adapter_path
    settings["pretrained_ip_adapter_sha256"] = sha256_file(ip_adapter) if ip_adapter and Path(ip_adapter).is_file() else ip_adapter
    if args.lr_scheduler not in _CONSTANT_SCHEDULES:
        settings["schedule_total_steps"] = total_steps  # a decaying schedule's shape depends on the run's length
    return json.loads(json.dumps(settings, default=str))  # as recorded: tuples become lists, paths strings


def check_resume_settings(state_dir: str | os.PathLike, now: Mapping[str, Any], allowed: Iterable[str]) -> list[str]:
    """The settings that differ from the state's and were allowed to (`--change_on_resume`); any other difference is an error."""
    path = Path(state_dir) / SETTINGS_NAME
    recorded = read_recorded(path, "training settings")
    if recorded is None:
        raise BadInputError(f"{path}: missing; without it this resume cannot be checked to continue the same run")
    differing = sorted(key for key in recorded.keys() | now.keys() if recorded.get(key) != now.get(key))
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
    changed: Iterable[str], args: argparse.Namespace, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR
) -> None:
    """After `load_state`: the restored optimizer and schedule take the new learning rate and weight decay.

    The schedule object was built from the new flags (its lambdas follow the new `--lr_scheduler`
    and warmup) but `load_state` restored the old base learning rates; this resets them and the
    current learning rate to `new lr x new lambda(step)`.
    """
    changed = set(changed)
    if changed & {"learning_rate", "lr_scheduler", "lr_warmup_steps"}:
        scheduler.base_lrs = [args.learning_rate for _ in optimizer.param_groups]
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if "weight_decay" in changed:
        for group in optimizer.param_groups:
            group["weight_decay"] = args.weight_decay
