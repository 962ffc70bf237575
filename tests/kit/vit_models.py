"""Session fixtures over the tiny ViT-family backbones of `patch_quality.random_models`, and synthetic images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from patch_quality.random_models import (  # noqa: F401  (re-exported for test modules)
    TINY_IMAGE_SIZE,
    TINY_PATCH_SIZE,
    save_tiny_clip_vision,
    save_tiny_dinov2,
    save_tiny_dinov2_registers,
    save_tiny_vit,
)


def structured_texture(seed: int, size: int = 64, cells: int = 4, noise: float = 0.25) -> Image.Image:
    """A smooth random colour field plus fine noise: every patch looks different, like a photo."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, cells, cells, generator=generator)
    image = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    image = image + noise * torch.rand(1, 3, size, size, generator=generator)
    array = (image[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    return Image.fromarray(array)



@pytest.fixture(scope="session")
def tiny_dinov2_dir(tmp_path_factory) -> Path:
    return save_tiny_dinov2(tmp_path_factory.mktemp("tiny_dinov2"))


@pytest.fixture(scope="session")
def tiny_dinov2_registers_dir(tmp_path_factory) -> Path:
    return save_tiny_dinov2_registers(tmp_path_factory.mktemp("tiny_dinov2_registers"))


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("tiny_vit"))


@pytest.fixture(scope="session")
def tiny_clip_vision_dir(tmp_path_factory) -> Path:
    return save_tiny_clip_vision(tmp_path_factory.mktemp("tiny_clip_vision"))
