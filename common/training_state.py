"""`checkpoint-N/training_state` folders: written whole or not at all, found again on resume."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import BadInputError

if TYPE_CHECKING:
    from accelerate import Accelerator

TRAINING_STATE_DIR = "training_state"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


def save_training_state(accelerator: Accelerator, checkpoint_dir: str | os.PathLike) -> Path:
    """Full accelerate state in `checkpoint_dir/training_state`, renamed into place when complete."""
    final = Path(checkpoint_dir) / TRAINING_STATE_DIR
    partial = final.with_name(TRAINING_STATE_DIR + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    accelerator.wait_for_everyone()
    return final


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
        return path
    return max(_with_training_state(output_dir), key=checkpoint_step, default=None)


def _with_training_state(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir` holding a complete training state."""
    root = Path(output_dir)
    return [p for p in root.glob("checkpoint-*") if _CHECKPOINT_DIR.match(p.name) and (p / TRAINING_STATE_DIR).is_dir()]


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
