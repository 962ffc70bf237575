"""Build the model a DreamBench run generates with: a local SDXL pipeline + IP-Adapter-Plus.

Loading fails in many unhelpful ways deep inside diffusers/transformers (a missing sub-folder, a
half-copied checkpoint). Everything here is checked up front or re-raised as one line naming the
path and what was expected, before any image is generated.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline

from common.errors import BadInputError
from common.flags import DTYPE_NAMES
from common.hub import resolve_file, resolve_folder
from common.precision import mixed_precision_dtype
from ip_adapter.checkpoint import load_ip_adapter_checkpoint, require_checkpoint_file
from ip_adapter.ip_adapter import IPAdapterPlusXL

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def resolve_dtype(override: str | None, mixed_precision: str, device: torch.device | str) -> torch.dtype:
    """`--dtype` if given; otherwise accelerate's mixed precision on an accelerator and fp32 on CPU.

    Half precision on CPU is slow and poorly supported, so CPU runs default to fp32 even under a
    mixed-precision accelerate config.
    """
    if override is not None:
        if override not in DTYPES:
            raise BadInputError(f"unknown dtype {override!r}; expected one of {sorted(DTYPES)}")
        return DTYPES[override]
    if torch.device(device).type == "cpu":
        return torch.float32
    return mixed_precision_dtype(mixed_precision)


def vae_scale_factor(vae_config: Mapping[str, Any]) -> int:
    """Pixels per latent cell, as diffusers' pipelines compute `vae_scale_factor` (8 for SDXL's VAE, 2 for the test VAE)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def check_sdxl_dir(path: str | os.PathLike, revision: str | None = None, variant: str | None = None) -> Path:
    """A `save_pretrained` SDXL folder (or a Hugging Face id, `common.hub`): model_index.json and every component it names."""
    path = resolve_folder(path, "--base_model_path", revision, SDXL_COMPONENTS, variant)
    expected = "expected a diffusers StableDiffusionXLPipeline folder (save_pretrained layout)"
    if not path.is_dir():
        raise BadInputError(f"{path}: base model folder not found; {expected}")
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise BadInputError(f"{index_path}: missing; {expected}")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{index_path}: unreadable ({_one_line(exc)}); {expected}") from None
    for component in SDXL_COMPONENTS:
        if component not in index:
            raise BadInputError(f"{index_path}: no {component!r} entry; {expected}")
        if not (path / component).is_dir():
            raise BadInputError(f"{path / component}: component folder missing; {expected}")
    return path


def check_image_encoder_dir(path: str | os.PathLike) -> Path:
    path = resolve_folder(path, "--image_encoder_path")
    expected = "expected a CLIPVisionModelWithProjection folder with config.json and weights"
    if not path.is_dir():
        raise BadInputError(f"{path}: image encoder folder not found; {expected}")
    if not (path / "config.json").is_file():
        raise BadInputError(f"{path / 'config.json'}: missing; {expected}")
    return path


def check_ip_ckpt(path: str | os.PathLike) -> Path:
    return require_checkpoint_file(resolve_file(path, "--ip_ckpt"), "--ip_ckpt")


def load_sdxl_pipeline(base_model_path: str | os.PathLike, dtype: torch.dtype) -> StableDiffusionXLPipeline:
    """A local SDXL pipeline for batched generation (on CPU; the caller or the wrapper moves it).

    The VAE decodes one image at a time (a batch of 1024-pixel images would not fit otherwise) and
    the pipeline's own progress bar is off: callers show one bar per process over all their images.
    """
    base_model_path = check_sdxl_dir(base_model_path)
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(str(base_model_path), dtype=dtype, local_files_only=True, add_watermarker=False)
    except (OSError, ValueError, KeyError) as exc:
        raise BadInputError(f"{base_model_path}: cannot load the SDXL pipeline ({_one_line(exc)})") from None
    pipe.vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_generation_model(
    base_model_path: str | os.PathLike,
    image_encoder_path: str | os.PathLike,
    ip_ckpt: str | os.PathLike,
    device: torch.device | str,
    dtype: torch.dtype,
) -> IPAdapterPlusXL:
    """SDXL + IP-Adapter-Plus on `device` in `dtype`, ready for batched generation (each call gives its scale)."""
    image_encoder_path = check_image_encoder_dir(image_encoder_path)
    ip_ckpt = check_ip_ckpt(ip_ckpt)
    checkpoint = load_ip_adapter_checkpoint(ip_ckpt)  # a bad checkpoint fails before SDXL spends minutes loading
    pipe = load_sdxl_pipeline(base_model_path, dtype)
    try:
        ip_model = IPAdapterPlusXL(pipe, image_encoder_path, checkpoint, device=device, checkpoint_file=ip_ckpt)
    except OSError as exc:  # transformers' from_pretrained on a broken image encoder folder
        raise BadInputError(f"{image_encoder_path}: cannot load the image encoder ({_one_line(exc)})") from None
    return ip_model


def check_generator_paths(args: argparse.Namespace) -> None:
    """Fail on a bad model path before any model is loaded or any file is written."""
    check_sdxl_dir(args.base_model_path)
    check_image_encoder_dir(args.image_encoder_path)
    check_ip_ckpt(args.ip_ckpt)
