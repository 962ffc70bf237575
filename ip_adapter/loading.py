"""Checks and choices every model load shares: the image encoder folder, the IP-Adapter checkpoint file,
the dtype, the VAE scale factor. The base model itself is checked and loaded by its family
(`base_models.generation`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from common.errors import BadInputError
from common.flags import DTYPE_NAMES
from common.hub import resolve_file, resolve_folder
from common.precision import mixed_precision_dtype
from ip_adapter.checkpoint import require_checkpoint_file

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


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


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


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
