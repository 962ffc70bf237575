"""`checkpoint-N/training_state/`: what a resume reads, in formats that cannot run code, written whole or not at all.

A state is four files, all written by the main process (`save_training_state`) and read back by
`load_training_state`, the one pair that owns the format:

* `state.json`: the format, the step, the optimizer's, LR schedule's and fp16 gradient scaler's state
  dicts as JSON (`common.tensor_tree`: tensors are references into `state.safetensors`), the name of
  the weights file and the sha256 of every other file of the state;
* `state.safetensors`: the tensors of those state dicts (Adam's moments and step counts);
* the trainer's weights (`TrainedWeights`, a safetensors file: the adapter, ssl_train's blocks);
* `settings.json` (train_patchdpo.py): what the run was trained with, compared on resume.

Nothing is unpickled: JSON and safetensors cannot carry code, and files the state does not list are
never opened. Nothing else is needed: every random draw of training is keyed on (seed, epoch, dataset
index), so the global RNG states accelerate pickles are not restored, and accelerate's accumulation
counter only matters modulo the accumulation, where it is 0 at every optimizer step (states are saved
there). A state an earlier version saved through accelerate (`optimizer.bin`, `custom_checkpoint_0.pkl`,
`random_states_*.pkl`: pickles) is refused in one line naming its weights file to start again from.

The state is written into `training_state.partial/` and renamed into place when complete. It can
still be damaged later (a full disk, a copy that stopped half-way), so a resume checks every file
against its recorded sha256 before reading any (`check_training_state`; a failure is one line naming
the file, and `common.checkpoints` decides which state a resume starts from). A sharded optimizer (FSDP2 DTensors) would gather its full state dict
before `save_training_state` and shard it again after `load_training_state`: the format stays a flat
dict of plain tensors plus JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.distributed import gather_values
from common.errors import BadInputError, WriteError
from common.io import atomic_write, atomic_write_json, reporting_write_errors, sha256_file
from common.tensor_tree import join_tensors, split_tensors

if TYPE_CHECKING:
    from accelerate import Accelerator

TRAINING_STATE_DIR = "training_state"
MANIFEST_NAME = "state.json"
TENSORS_NAME = "state.safetensors"
#: What the run that saved a state was trained with (`patchdpo.run_settings`), compared on resume.
SETTINGS_NAME = "settings.json"
FORMAT, VERSION = "patchdpo-training-state", 1
#: Files of a state saved through accelerate's `save_state` by earlier versions: pickles, never read.
_ACCELERATE_FILES = re.compile(r"^(optimizer(_\d+)?\.bin|scheduler(_\d+)?\.bin|scaler\.pt|.*\.pkl)$")


@dataclass(frozen=True)
class TrainedWeights:
    """The trainer's file of its trainable weights inside a state: `save(path)` on the main process, `load(path)` on every one."""

    name: str
    save: Callable[[Path], object]
    load: Callable[[Path], object]

    def __post_init__(self) -> None:
        if not self.name.endswith(".safetensors"):
            raise ValueError(f"a training state's weights are a .safetensors file (nothing in it runs on load), got {self.name!r}")


@dataclass(frozen=True)
class Resumable:
    """What a state restores besides the step: weights, optimizer and (when the run has them) LR schedule and fp16 scaler."""

    weights: TrainedWeights
    optimizer: Any  # torch.optim.Optimizer (or accelerate's wrapper of one)
    scheduler: Any = None  # an LR scheduler
    scaler: Any = None  # torch.amp.GradScaler (accelerate's, under --mixed_precision fp16)

    def state_dict_owners(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler}


@dataclass(frozen=True)
class CheckedState:
    """A `checkpoint-N` folder whose training state checked out (`check_training_state`), and that state's manifest."""

    directory: Path
    manifest: dict[str, Any]

    @property
    def state_dir(self) -> Path:
        return self.directory / TRAINING_STATE_DIR

    @property
    def step(self) -> int:
        return self.manifest["step"]


def save_training_state(
    accelerator: Accelerator, checkpoint_dir: str | os.PathLike, resumable: Resumable, step: int, settings: dict | None = None
) -> Path:
    """Write the state of `step` (and the run's `settings`) to `checkpoint_dir/training_state`; call it on every process.

    A failed write (full disk, file-size limit) is the same one-line `WriteError` on every process; the previous states stay.
    """
    final = Path(checkpoint_dir) / TRAINING_STATE_DIR
    failure = None
    if accelerator.is_main_process:
        try:
            _write_state(final, resumable, step, settings)
        except WriteError as error:
            failure = error
    main_failure = gather_values(accelerator, None if failure is None else str(failure))[0]  # no process waits on a failed main
    if failure is not None:
        raise failure
    if main_failure is not None:
        raise WriteError(main_failure)
    return final


def _write_state(final: Path, resumable: Resumable, step: int, settings: dict | None) -> None:
    from safetensors.torch import save_file

    partial = final.with_name(TRAINING_STATE_DIR + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with reporting_write_errors(partial):
        partial.mkdir(parents=True)
        resumable.weights.save(partial / resumable.weights.name)
        tensors: dict = {}
        trees = {
            part: None if owner is None else split_tensors(owner.state_dict(), part, tensors)
            for part, owner in resumable.state_dict_owners().items()
        }
        atomic_write(partial / TENSORS_NAME, lambda tmp: save_file(tensors, str(tmp)))
        if settings is not None:
            atomic_write_json(partial / SETTINGS_NAME, settings)
        files = {path.name: sha256_file(path) for path in sorted(partial.iterdir())}
        manifest = {"format": FORMAT, "version": VERSION, "step": step, "weights": resumable.weights.name, "files": files, **trees}
        atomic_write_json(partial / MANIFEST_NAME, manifest)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)


def check_training_state(state_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the state in `state_dir`, once every file it lists has its recorded sha256; else one line naming the file."""
    state_dir = Path(state_dir)
    path = state_dir / MANIFEST_NAME
    if not path.is_file():
        raise BadInputError(_without_manifest(state_dir))
    manifest = _read_manifest(path)
    for name, digest in manifest["files"].items():
        file = state_dir / name
        if not file.is_file():
            raise BadInputError(f"{file}: missing; the training state is incomplete")
        if sha256_file(file) != digest:
            raise BadInputError(f"{file}: its content is not what was saved (sha256 differs from {path}): damaged or changed since")
    return manifest


def load_training_state(checked: CheckedState, resumable: Resumable) -> int:
    """Restore the weights, optimizer, schedule and scaler of a checked state (`find_resume_checkpoint`); its step."""
    from safetensors.torch import load_file

    manifest, state_dir = checked.manifest, checked.state_dir
    path = state_dir / MANIFEST_NAME
    if manifest["weights"] != resumable.weights.name:
        raise BadInputError(f"{path}: the state holds {manifest['weights']}, this trainer resumes from {resumable.weights.name}")
    try:
        tensors = load_file(str(state_dir / TENSORS_NAME))
    except Exception as error:  # safetensors raises its own error types for a damaged file
        raise BadInputError(f"{state_dir / TENSORS_NAME}: unreadable ({_detail(error)})") from None
    for part, owner in resumable.state_dict_owners().items():
        tree = manifest.get(part)
        if (tree is None) != (owner is None):
            saved, now = ("without", "has one") if tree is None else ("with", "has none")
            raise BadInputError(f"{path}: saved {saved} a {part} state and this run {now}; resume with the settings it was saved with")
        if owner is not None:
            try:
                owner.load_state_dict(join_tensors(tree, tensors))
            except (KeyError, ValueError, TypeError) as error:  # a state dict this owner cannot take: the file's fault
                raise BadInputError(f"{path}: its {part} state does not fit this run ({_detail(error)})") from None
    resumable.weights.load(state_dir / resumable.weights.name)
    return checked.step


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadInputError(f"{path}: unreadable training state ({_detail(error)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BadInputError(f'{path}: not a training state (no "format": {FORMAT!r})')
    if manifest.get("version") != VERSION:
        raise BadInputError(f"{path}: training-state version {manifest.get('version')!r}, this version reads {VERSION}")
    files, step = manifest.get("files"), manifest.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise BadInputError(f'{path}: "step" must be a non-negative integer, got {step!r}')
    if not isinstance(files, dict) or not all(isinstance(name, str) and isinstance(digest, str) for name, digest in files.items()):
        raise BadInputError(f'{path}: "files" must map file names to sha256 digests')
    bad_name = next((name for name in files if Path(name).name != name or name in (".", "..", MANIFEST_NAME)), None)
    if bad_name is not None or not {TENSORS_NAME, manifest.get("weights")} <= files.keys():
        raise BadInputError(f'{path}: "files" must list {TENSORS_NAME} and the weights file of this folder, got {sorted(files)}')
    return manifest


def _without_manifest(state_dir: Path) -> str:
    pickles = sorted(path.name for path in state_dir.iterdir() if _ACCELERATE_FILES.match(path.name)) if state_dir.is_dir() else []
    if not pickles:
        return f"{state_dir / MANIFEST_NAME}: missing; the training state is incomplete"
    weights = ", ".join(str(path) for path in sorted(state_dir.glob("*.safetensors"))) or "none left"
    return (
        f"{state_dir}: saved by an earlier version through accelerate's pickles ({', '.join(pickles)}), which a resume no longer reads "
        f"(unpickling can run code); start a new run in another --output_dir from its weights ({weights})"
    )


def _detail(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
