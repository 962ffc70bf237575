"""Tiny random ViT-family backbones saved in the real `save_pretrained` layout.

No pretrained weights exist on the test machine (nor for the offline demo), so the patch-feature code is exercised on
randomly initialised models that have the same classes, configs and on-disk files (config.json,
model.safetensors, preprocessor_config.json) as DINOv2, DINOv2-with-registers, ViT/DINO and CLIP
vision checkpoints. 64 px inputs with 8 px patches give an 8x8 patch grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    BitImageProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

TINY_IMAGE_SIZE = 64
TINY_PATCH_SIZE = 8
_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH_SIZE)


def _save(model: torch.nn.Module, processor, path: Path) -> Path:
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_tiny_dinov2(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(mlp_ratio=2, **_COMMON)).eval()
    processor = BitImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    )
    return _save(model, processor, path)


def save_tiny_dinov2_registers(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=4, **_COMMON)).eval()
    processor = BitImageProcessor(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    )
    return _save(model, processor, path)


def save_tiny_vit(path: Path, seed: int = 0) -> Path:
    """Plain ViTModel: the class the DINO (v1) checkpoints load as."""
    torch.manual_seed(seed)
    model = ViTModel(ViTConfig(intermediate_size=64, **_COMMON), add_pooling_layer=False).eval()
    processor = ViTImageProcessor(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD
    )
    return _save(model, processor, path)


def save_tiny_clip_vision(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(intermediate_size=64, projection_dim=16, **_COMMON)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    return _save(model, processor, path)


def structured_texture(seed: int, size: int = 64, cells: int = 4, noise: float = 0.25) -> Image.Image:
    """A smooth random colour field plus fine noise: every patch looks different, like a photo."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, cells, cells, generator=generator)
    image = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    image = image + noise * torch.rand(1, 3, size, size, generator=generator)
    array = (image[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    return Image.fromarray(array)
