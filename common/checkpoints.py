"""The `checkpoint-N` folders of a training run's `--output_dir`: which one a resume starts from, and what a new run may not reuse.

`--resume_from_checkpoint` takes `latest` (the newest state that checks out, falling back past
damaged ones with a warning naming each; None for a folder without checkpoints, so a requeued job's
first start begins at step 0), a bare `checkpoint-N` name (looked up in `--output_dir`, as diffusers'
scripts do) or a folder path; anything else is one line listing the checkpoints that exist. A fresh
start into a folder that holds an earlier run's checkpoints or logs is refused (`refuse_earlier_run`)
unless the user asks to start over (`remove_earlier_run`, `--overwrite_output_dir`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from common.errors import BadInputError
from common.io import remove_stale_temp_files
from common.training_state import MANIFEST_NAME, TRAINING_STATE_DIR, CheckedState, check_training_state

logger = logging.getLogger(__name__)

_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(checkpoint_dir: str | os.PathLike) -> int:
    match = _CHECKPOINT_DIR.match(Path(checkpoint_dir).name)
    if match is None:
        raise BadInputError(f"{checkpoint_dir} is not a 'checkpoint-N' folder")
    return int(match.group(1))


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir`, oldest first."""
    root = Path(output_dir)
    found = [path for path in root.glob("checkpoint-*") if _CHECKPOINT_DIR.match(path.name) and path.is_dir()] if root.is_dir() else []
    return sorted(found, key=checkpoint_step)


def listing(names: Iterable[str], most: int = 6) -> str:
    """`a, b, c` for a few names; the first and last ones and the count for many (one line at any scale)."""
    names = list(names)
    if len(names) <= most:
        return ", ".join(names)
    return f"{', '.join(names[:3])}, ..., {', '.join(names[-2:])} ({len(names)} in all)"


def _held_checkpoints(output_dir: str | os.PathLike) -> str:
    names = [path.name for path in checkpoint_dirs(output_dir)]
    return f"--output_dir {output_dir} holds {listing(names)}" if names else f"--output_dir {output_dir} holds no checkpoint-N folder"


def state_fingerprint(state_dir: str | os.PathLike) -> list[tuple[str, int, int]]:
    """(name, size, mtime in ns) of each file of a training state: equal on every node that sees the same files."""
    return [(path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in sorted(Path(state_dir).iterdir()) if path.is_file()]


def find_resume_checkpoint(output_dir: str | os.PathLike, resume_from: str) -> CheckedState | None:
    """The checked state `--resume_from_checkpoint` names: `latest` (None for an `output_dir` without checkpoints),
    a bare `checkpoint-N` name (looked up in `output_dir`, as diffusers' scripts do) or a folder path."""
    if resume_from == "latest":
        return _latest(output_dir)
    path = Path(resume_from)
    if "/" not in resume_from and resume_from not in (".", ".."):
        path = Path(output_dir) / resume_from
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise BadInputError(f"--resume_from_checkpoint {resume_from}: {path} {what}; {_held_checkpoints(output_dir)}")
    return _checked(path)


def _checked(directory: Path) -> CheckedState:
    state_dir = directory / TRAINING_STATE_DIR
    if not state_dir.is_dir():
        raise BadInputError(f"{directory} holds no {TRAINING_STATE_DIR}/ (saved by --checkpointing_steps); cannot resume from it")
    checked = CheckedState(directory, check_training_state(state_dir))
    named = _CHECKPOINT_DIR.match(directory.name)
    if named and int(named[1]) != checked.step:
        raise BadInputError(f"{state_dir / MANIFEST_NAME}: saved at step {checked.step}, but its folder is named {directory.name}")
    return checked


def _latest(output_dir: str | os.PathLike) -> CheckedState | None:
    """The newest checked state; None when `output_dir` holds no checkpoint; one line when it holds some but none checks out."""
    checkpoints = checkpoint_dirs(output_dir)
    damaged = []
    for directory in reversed(checkpoints):
        if not (directory / TRAINING_STATE_DIR).is_dir():
            continue
        try:
            return _checked(directory)
        except BadInputError as error:
            logger.warning(f"skipping a damaged training state: {error}; trying an older checkpoint")
            damaged.append(directory.name)
    if not checkpoints:
        return None
    why = f"the training states of {listing(damaged)} are damaged (see the warnings)" if damaged else "none holds a training state"
    raise BadInputError(
        f"--resume_from_checkpoint latest: {output_dir} holds {listing(path.name for path in checkpoints)} but {why}: nothing to "
        "resume (training states are saved with --checkpointing_steps); start over with --overwrite_output_dir or choose another --output_dir"
    )


def earlier_run(output_dir: str | os.PathLike, log_dirs: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """What an earlier run left in `output_dir`: its `checkpoint-N` folders and the non-empty `log_dirs`."""
    logs = [Path(folder) for folder in log_dirs if Path(folder).is_dir() and any(Path(folder).iterdir())]
    return [*checkpoint_dirs(output_dir), *logs]


def refuse_earlier_run(output_dir: str | os.PathLike, log_dirs: Iterable[str | os.PathLike] = ()) -> None:
    """A fresh start into a folder holding another run's outputs: one line naming them and the ways forward."""
    found = earlier_run(output_dir, log_dirs)
    if found:
        root = Path(output_dir)
        names = [str(path.relative_to(root)) if path.is_relative_to(root) else str(path) for path in found]
        *most, last = names
        raise BadInputError(
            f"--output_dir {output_dir} holds {', '.join(most) + ' and ' if most else ''}{last} of an earlier run: continue it with "
            "--resume_from_checkpoint latest, start over with --overwrite_output_dir (removes them), or choose another --output_dir"
        )


def remove_earlier_run(output_dir: str | os.PathLike, log_dirs: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """`--overwrite_output_dir`: delete what `earlier_run` finds (checkpoints and logs); everything else in the folder stays."""
    found = earlier_run(output_dir, log_dirs)
    for path in found:
        shutil.rmtree(path)
    if found:
        logger.warning(f"--overwrite_output_dir: removed {listing(str(path) for path in found)} of an earlier run")
    return found


def remove_orphan_checkpoint_files(output_dir: str | os.PathLike) -> list[Path]:
    """Temporary files and half-saved `training_state.partial/` folders that killed runs left in `checkpoint-N/`.

    Temporary files of a live process are kept (`common.io.remove_stale_temp_files`); call this
    from the main process before training starts.
    """
    root = Path(output_dir)
    folders = checkpoint_dirs(root)
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
    removed = [path for path in checkpoint_dirs(output_dir) if (path / TRAINING_STATE_DIR).is_dir()][:-keep]
    for checkpoint in removed:
        shutil.rmtree(checkpoint / TRAINING_STATE_DIR)
        if not any(checkpoint.iterdir()):
            checkpoint.rmdir()
    return removed
