"""`run_config.json`: what produced the images of a DreamBench output folder.

A resumed run adds images to a folder that may already hold hundreds; if its settings differed
(another checkpoint, scale, step count...) the folder would silently mix two experiments and its
scores would mean nothing. The file records every argument plus the checkpoint's sha256, and a run
whose generation settings differ from the recorded ones is refused instead of resumed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import diffusers
import torch
import transformers

from common.distributed import owning_output_dir
from common.errors import BadInputError
from common.hub import recorded_name
from common.io import atomic_write_json, remove_stale_temp_files
from common.recorded_settings import read_recorded, refuse_other_settings

if TYPE_CHECKING:
    from accelerate import Accelerator

RUN_CONFIG_NAME = "run_config.json"
# Model arguments that arrive as plain strings (a model name or a path); Path-typed ones are recorded the same way.
MODEL_NAME_KEYS = ("clip_model", "dino_model")

# Settings an image depends on. Everything else (batch size, subjects, process count, scoring
# models) only decides which images are made, how fast, or what happens after.
GENERATION_KEYS: tuple[str, ...] = (
    "base_model_path",
    "image_encoder_path",
    "ip_ckpt_sha256",
    "data_root",
    "is_kosmosg",
    "scale",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "height",
    "width",
    "dtype",
)


def run_config_path(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / RUN_CONFIG_NAME


def library_versions() -> dict[str, str]:
    """Bit-identical resumes also need the same kernels; the versions tell a later reader why not."""
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def make_run_config(arguments: Mapping[str, Any], **derived: Any) -> dict[str, Any]:
    """Every argument (local paths made absolute, Hugging Face ids and model names as given), derived values, versions."""
    config = {
        key: recorded_name(value) if isinstance(value, os.PathLike) or (key in MODEL_NAME_KEYS and value is not None) else value
        for key, value in arguments.items()
    }
    config.update(derived)
    config["versions"] = library_versions()
    missing = [key for key in GENERATION_KEYS if key not in config]
    if missing:
        raise BadInputError(f"run config lacks generation setting(s) {missing}")
    return config


def read_run_config(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The recorded config, or None for a folder no run has claimed yet."""
    return read_recorded(run_config_path(output_dir), "run config")


def check_resumable(output_dir: str | os.PathLike, config: Mapping[str, Any], keys: Iterable[str] = GENERATION_KEYS) -> None:
    """Refuse to add images made with other generation settings (`keys`) to an existing output folder."""
    recorded = read_run_config(output_dir)
    if recorded is not None:
        refuse_other_settings(run_config_path(output_dir), recorded, config, keys, "generation settings")


def write_run_config(output_dir: str | os.PathLike, config: Mapping[str, Any]) -> Path:
    return atomic_write_json(run_config_path(output_dir), dict(config))


def start_in_output_dir(
    accelerator: Accelerator,
    held: contextlib.ExitStack,
    output_dir: Path,
    image_folders: Iterable[str],
    config: Mapping[str, Any],
    drop_outdated: Callable[[], object] | None = None,
) -> None:
    """Claim the folder for this run (released when `held` closes), drop what an interrupted run left half-written, record the settings.

    Called once the inputs are checked and the model is loaded, so a bad command leaves no
    `run_config.json` behind that would then refuse the corrected one; every process waits for it.
    `drop_outdated` (main process) deletes files the new settings outdate before they are recorded,
    so an interrupted run never leaves old files under a record that vouches for them.
    """
    held.enter_context(owning_output_dir(accelerator, output_dir))
    if accelerator.is_main_process:
        removed = remove_stale_temp_files(output_dir, image_folders)
        if removed:
            print(f"removed {len(removed)} unfinished file(s) left by an interrupted run", flush=True)
        if drop_outdated is not None:
            drop_outdated()
        write_run_config(output_dir, config)
    accelerator.wait_for_everyone()
