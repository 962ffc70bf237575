"""`checkpoint-N/training_state` folders: written whole or not at all, found again on resume.

A state can still be damaged after it was written (a full disk, a copy that stopped half-way), so
resuming checks that every file of the state loads: an explicit `--resume_from_checkpoint` folder
that does not is a one-line error naming the file, and `latest` falls back to the newest state that
does, with a warning.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import BadInputError
from common.io import atomic_write_json, remove_stale_temp_files, reporting_write_errors

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

TRAINING_STATE_DIR = "training_state"
#: What the run that saved a state was trained with (`patchdpo.run_settings`), compared on resume.
SETTINGS_NAME = "settings.json"
#: Files every state holds: accelerate's optimizer state (both trainers have one optimizer).
REQUIRED_STATE_FILES = ("optimizer.bin",)
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


def save_training_state(accelerator: Accelerator, checkpoint_dir: str | os.PathLike, settings: dict | None = None) -> Path:
    """Full accelerate state (and the run's `settings`) in `checkpoint_dir/training_state`, renamed into place when complete.

    A failed write (full disk, file-size limit) is a one-line `WriteError`; the previous states stay.
    """
    final = Path(checkpoint_dir) / TRAINING_STATE_DIR
    partial = final.with_name(TRAINING_STATE_DIR + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    with reporting_write_errors(partial):
        accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if settings is not None:
            atomic_write_json(partial / SETTINGS_NAME, settings)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    accelerator.wait_for_everyone()
    return final


def state_fingerprint(state_dir: str | os.PathLike) -> list[tuple[str, int, int]]:
    """(name, size, mtime in ns) of each file of a training state: equal on every node that sees the same files."""
    return [(path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in sorted(Path(state_dir).iterdir()) if path.is_file()]


def checkpoint_step(checkpoint_dir: str | os.PathLike) -> int:
    match = _CHECKPOINT_DIR.match(Path(checkpoint_dir).name)
    if match is None:
        raise BadInputError(f"{checkpoint_dir} is not a 'checkpoint-N' folder")
    return int(match.group(1))


def find_resume_checkpoint(output_dir: str | os.PathLike, resume_from: str) -> Path | None:
    """`"latest"`: the highest `checkpoint-N` holding a complete training state, or None; else that folder."""
    if resume_from != "latest":
        path = Path(resume_from)
        if not (path / TRAINING_STATE_DIR).is_dir():
            raise BadInputError(f"{path} holds no {TRAINING_STATE_DIR}/ (saved by --checkpointing_steps); cannot resume from it")
        checkpoint_step(path)
        check_training_state(path / TRAINING_STATE_DIR)
        return path
    for candidate in sorted(_with_training_state(output_dir), key=checkpoint_step, reverse=True):
        try:
            check_training_state(candidate / TRAINING_STATE_DIR)
        except BadInputError as error:
            logger.warning(f"skipping a damaged training state: {error}; trying an older checkpoint")
            continue
        return candidate
    return None


def _with_training_state(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir` holding a complete training state."""
    root = Path(output_dir)
    return [p for p in root.glob("checkpoint-*") if _CHECKPOINT_DIR.match(p.name) and (p / TRAINING_STATE_DIR).is_dir()]


def check_training_state(state_dir: str | os.PathLike) -> None:
    """Every file of an accelerate state loads (safetensors and weights-only torch files); else one line naming it.

    `random_states_*.pkl` is not checked: accelerate tolerates an unreadable one.
    """
    import torch
    from safetensors.torch import load_file

    state_dir = Path(state_dir)
    for name in REQUIRED_STATE_FILES:
        if not (state_dir / name).is_file():
            raise BadInputError(f"{state_dir / name}: missing; the training state is incomplete")
    for path in sorted(state_dir.iterdir()):
        try:
            if path.suffix == ".safetensors":
                load_file(str(path))
            elif path.suffix == ".bin":
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch and safetensors raise many types for a truncated or corrupt file
            detail = " ".join(str(error).split())[:200] or type(error).__name__
            raise BadInputError(f"{path}: corrupt training state file ({type(error).__name__}: {detail})") from None


def remove_orphan_checkpoint_files(output_dir: str | os.PathLike) -> list[Path]:
    """Temporary files and half-saved `training_state.partial/` folders that killed runs left in `checkpoint-N/`.

    Temporary files of a live process are kept (`common.io.remove_stale_temp_files`); call this
    from the main process before training starts.
    """
    root = Path(output_dir)
    folders = [p for p in sorted(root.glob("checkpoint-*")) if _CHECKPOINT_DIR.match(p.name) and p.is_dir()]
    removed = remove_stale_temp_files(root, [p.name for p in folders] + [f"{p.name}/{TRAINING_STATE_DIR}" for p in folders], suffix="*")
    for partial in (p / (TRAINING_STATE_DIR + ".partial") for p in folders):
        if partial.is_dir():
            shutil.rmtree(partial)
            removed.append(partial)
    if removed:
        logger.warning(f"removed {len(removed)} unfinished file(s) left in {root} by an interrupted run")
    return removed


def prune_training_states(output_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete training states (`--checkpoints_total_limit`).

    Only `training_state/` folders go: the `model.bin` next to them is the run's product and stays
    (a folder left empty is removed). The newest complete state is never deleted (`keep` >= 1).
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    removed = sorted(_with_training_state(output_dir), key=checkpoint_step)[:-keep]
    for checkpoint in removed:
        shutil.rmtree(checkpoint / TRAINING_STATE_DIR)
        if not any(checkpoint.iterdir()):
            checkpoint.rmdir()
    return removed
