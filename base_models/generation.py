"""The model every generating script uses, for any base-model family: check a pipeline folder (or id)
before anything loads, load the family's pipeline wrapped with IP-Adapter-Plus, and the family's native
image size (the default `--height`/`--width`).

Loading fails in many unhelpful ways deep inside diffusers/transformers (a missing sub-folder, a
half-copied checkpoint). Everything here is checked up front or re-raised as one line naming the
path and what was expected, before any image is generated.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import DiffusionPipeline

from common.errors import BadInputError
from common.hub import resolve_file, resolve_folder
from ip_adapter.ip_adapter import ImagePromptAdapter
from ip_adapter.loading import check_image_encoder_dir, check_ip_ckpt, one_line

from . import family_of
from .family import BaseModelFamily

FLAG = "--base_model_path"
#: The sampling flags whose default is the family's (`BaseModelFamily.sampling_defaults`).
SAMPLING_DEFAULTED = ("num_inference_steps", "guidance_scale")
#: Pipeline options that would change or blank the images we generate and score (an invisible watermark, a safety
#: checker's black images); each is passed to the pipelines that take it.
_UNALTERED_IMAGES = {"add_watermarker": False, "safety_checker": None, "requires_safety_checker": False}


def check_base_model(
    path: str | os.PathLike, revision: str | None = None, variant: str | None = None, flag: str = FLAG
) -> tuple[Path, BaseModelFamily]:
    """The local folder and family of a `save_pretrained` pipeline folder or Hugging Face id, with every component its
    family loads (named in model_index.json and present as a sub-folder)."""
    family = family_of(path, flag, revision)
    folder = resolve_folder(path, flag, revision, family.components, variant)
    index_path = folder / "model_index.json"
    expected = f"expected a diffusers {family.pipeline_class_name} folder (save_pretrained layout)"
    index = json.loads(index_path.read_text())  # family_of has read it
    for component in family.components:
        if component not in index:
            raise BadInputError(f"{index_path}: no {component!r} entry; {expected}")
        if not (folder / component).is_dir():
            raise BadInputError(f"{folder / component}: component folder missing; {expected}")
    return folder, family


def check_generator_paths(base_model_path: str | os.PathLike, image_encoder_path: str | os.PathLike, ip_ckpt: str | os.PathLike) -> None:
    """Fail on a bad model path before any model is loaded or any file is written."""
    check_base_model(base_model_path)
    check_image_encoder_dir(image_encoder_path)
    check_ip_ckpt(ip_ckpt)


def config_reader(base_model_path: str | os.PathLike, revision: str | None = None) -> Callable[[str], dict[str, Any]]:
    """`read_config(name)`: a component config of the pipeline folder (or id) as a dict, an unreadable one a one-line error."""

    def read_config(name: str) -> dict[str, Any]:
        path = resolve_file(f"{str(base_model_path).rstrip('/')}/{name}", FLAG, revision)
        try:
            return json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadInputError(f"{path}: unreadable ({one_line(exc)})") from None

    return read_config


def native_image_size(base_model_path: str | os.PathLike, revision: str | None = None) -> int:
    """The image edge the model's pipeline generates at by default (1024 for SDXL and FLUX.1, 512 for SD 1.5); only configs
    are read."""
    return family_of(base_model_path, FLAG, revision).native_image_size(config_reader(base_model_path, revision))


def _unaltered_images_options(pipeline_class: type[DiffusionPipeline]) -> dict[str, Any]:
    accepted = inspect.signature(pipeline_class.__init__).parameters
    return {name: value for name, value in _UNALTERED_IMAGES.items() if name in accepted}


def load_generation_pipeline(base_model_path: str | os.PathLike, dtype: torch.dtype) -> DiffusionPipeline:
    """The family's pipeline for batched generation (on CPU; the caller or the wrapper moves it).

    The VAE decodes one image at a time (a batch of 1024-pixel images would not fit otherwise) and
    the pipeline's own progress bar is off: callers show one bar per process over all their images.
    """
    folder, family = check_base_model(base_model_path)
    pipeline_class = family.pipeline_class()
    try:
        pipe = pipeline_class.from_pretrained(str(folder), dtype=dtype, local_files_only=True, **_unaltered_images_options(pipeline_class))
    except (OSError, ValueError, KeyError) as exc:
        raise BadInputError(f"{folder}: cannot load the {family.name} pipeline ({one_line(exc)})") from None
    pipe.vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_generation_model(
    base_model_path: str | os.PathLike,
    image_encoder_path: str | os.PathLike,
    ip_ckpt: str | os.PathLike,
    device: torch.device | str,
    dtype: torch.dtype,
) -> ImagePromptAdapter:
    """The base model + its family's IP-Adapter on `device` in `dtype`, ready for batched generation (each call gives its scale)."""
    image_encoder_path = check_image_encoder_dir(image_encoder_path)
    ip_ckpt = check_ip_ckpt(ip_ckpt)
    family = family_of(base_model_path, FLAG)
    checkpoint = family.ip_adapter_class().read_checkpoint(ip_ckpt)  # a bad checkpoint fails before the base model spends minutes loading
    pipe = load_generation_pipeline(base_model_path, dtype)
    return wrap_pipeline(pipe, family, image_encoder_path, checkpoint, ip_ckpt, device)


def wrap_pipeline(
    pipe: DiffusionPipeline,
    family: BaseModelFamily,
    image_encoder_path: str | os.PathLike,
    checkpoint: dict[str, Any],
    ip_ckpt: str | os.PathLike,
    device: torch.device | str,
) -> ImagePromptAdapter:
    """`pipe` (of `family`) with the family's IP-Adapter from `checkpoint` (its `read_checkpoint` of the file `ip_ckpt`) installed,
    on `device`."""
    try:
        return family.ip_adapter_class()(pipe, image_encoder_path, checkpoint, device=device, checkpoint_file=ip_ckpt)
    except OSError as exc:  # transformers' from_pretrained on a broken image encoder folder
        raise BadInputError(f"{image_encoder_path}: cannot load the image encoder ({one_line(exc)})") from None


def image_size(height: int | None, width: int | None, base_model_path: str | os.PathLike) -> tuple[int, int]:
    """`--height`/`--width` as given, the model's native size for either left out (its configs are read only then)."""
    if height is not None and width is not None:
        return height, width
    native = native_image_size(base_model_path)
    return height or native, width or native


Sized = TypeVar("Sized")


def with_model_defaults(config: Sized) -> Sized:
    """A script's typed settings (a dataclass with `base_model_path` and `common.flags.add_sampling_args`' fields) with an
    unset height or width set to the base model's native size and unset steps or guidance to its family's
    `sampling_defaults`."""
    height, width = image_size(config.height, config.width, config.base_model_path)
    family = family_of(config.base_model_path, FLAG)
    multiple = family.image_size_multiple(config_reader(config.base_model_path))
    for flag, size in (("--height", height), ("--width", width)):
        if size % multiple:
            raise BadInputError(f"{flag} {size}: a {family.name} model generates at multiples of {multiple} px; pass one")
    unset = {name: family.sampling_defaults[name] for name in SAMPLING_DEFAULTED if getattr(config, name) is None}
    return replace(config, height=height, width=width, **unset)
