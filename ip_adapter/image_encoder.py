"""CLIP vision side of IP-Adapter-Plus: preprocessing and penultimate-layer patch features."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from common.errors import BadInputError
from common.hub import resolve_folder


def preprocess_clip_images(images: Sequence[Image.Image]) -> torch.Tensor:
    """(N, 3, 224, 224) float32 CLIP input: the reference's `CLIPImageProcessor()` defaults
    (shortest side to 224 bicubic, centre crop 224, CLIP mean/std)."""
    processor = CLIPImageProcessor()
    return processor(images=[image.convert("RGB") for image in images], return_tensors="pt").pixel_values


def load_image_encoder(
    path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> CLIPVisionModelWithProjection:
    """Load a CLIP vision tower, frozen: a folder or an id such as `h94/IP-Adapter/models/image_encoder` (`common.hub`)."""
    path = resolve_folder(path, "--image_encoder_path")
    if not (path / "config.json").is_file():
        raise BadInputError(f"image encoder directory {path} has no config.json (expected a CLIPVisionModelWithProjection folder)")
    encoder = CLIPVisionModelWithProjection.from_pretrained(str(path), local_files_only=True)
    return encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)


def encode_image_features(encoder: CLIPVisionModelWithProjection, pixel_values: torch.Tensor) -> torch.Tensor:
    """Penultimate hidden states (N, 257, D): the features IP-Adapter-Plus resamples."""
    pixel_values = pixel_values.to(device=encoder.device, dtype=encoder.dtype)
    return encoder(pixel_values, output_hidden_states=True).hidden_states[-2]
