"""Random-weight Stable Diffusion 1.5 + IP-Adapter-Plus stand-ins, saved in the real on-disk layouts.

The SD 1.5 counterpart of `stand_ins.sdxl`: a `StableDiffusionPipeline` folder (one CLIP text
encoder, no safety checker, as `save_pretrained` writes it with `safety_checker=None`) and, beside
it, the h94 layout `models/image_encoder` (CLIP ViT-H) and `models/ip-adapter-plus_sd15.bin`
(Resampler dim 768, 12 heads of 64, 16 queries, depth 4 in the public file). `TINY` keeps SD 1.5's
structure at a few hundred thousand parameters; its VAE downsamples 4x (the real one 8x) and its
native size is 32 px, so tests see a latent grid and an image size unlike the SDXL stand-in's.
`FULL` is the published configs (memory plan).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig

from stand_ins.components import (
    FULL_VIT_H,
    SD_NOISE_SCHEDULE,
    TINY_VIT_H,
    build_clip_tokenizer,
    build_image_encoder,
    save_configs,
    save_ip_checkpoint,
    text_config,
    vae_config,
)

IP_CKPT_NAME = "ip-adapter-plus_sd15.bin"


@dataclass(frozen=True)
class SD15Shape:
    """Constructor arguments of every component; the UNet's `cross_attention_dim` is the text encoder's width."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    image_encoder: dict[str, Any]
    resampler: dict[str, Any]


def _unet(channels: tuple[int, ...], cross_dim: int, sample_size: int) -> dict[str, Any]:
    """SD 1.5's UNet: cross-attention in every level but the lowest, 8 heads, convolutional attention projections."""
    down = ("CrossAttnDownBlock2D",) * (len(channels) - 1) + ("DownBlock2D",)
    return dict(
        block_out_channels=channels,
        attention_head_dim=8,
        down_block_types=down,
        up_block_types=tuple(name.replace("Down", "Up") for name in reversed(down)),
        layers_per_block=2,
        in_channels=4,
        out_channels=4,
        cross_attention_dim=cross_dim,
        sample_size=sample_size,
    )


TINY = SD15Shape(
    unet=_unet((32, 64), cross_dim=32, sample_size=8),
    vae=vae_config((32, 64, 64), sample_size=32),
    text_encoder=text_config(32, 2, 4, act="quick_gelu"),
    image_encoder=TINY_VIT_H,
    # Depth 4, ff_mult 4 and 64-wide heads as the public file, so diffusers' converter accepts it.
    resampler=dict(dim=64, depth=4, heads=1),
)
FULL = SD15Shape(
    unet=_unet((320, 640, 1280, 1280), cross_dim=768, sample_size=64),
    vae=vae_config((128, 256, 512, 512), sample_size=512, scaling_factor=0.18215),
    text_encoder=text_config(768, 12, 12, act="quick_gelu"),
    image_encoder=FULL_VIT_H,
    resampler=dict(dim=768, depth=4, heads=12),
)
SHAPES = {"tiny": TINY, "full": FULL}


def build_sd15_pipeline(shape: SD15Shape = TINY, seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**shape.vae),
        text_encoder=CLIPTextModel(CLIPTextConfig(**shape.text_encoder)),
        tokenizer=build_clip_tokenizer(),
        unet=UNet2DConditionModel(**shape.unet),
        scheduler=PNDMScheduler(**SD_NOISE_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@dataclass(frozen=True)
class SD15Paths:
    sd15_dir: Path
    image_encoder_dir: Path
    ip_ckpt: Path


def _paths(root: Path) -> SD15Paths:
    return SD15Paths(sd15_dir=root / "sd15", image_encoder_dir=root / "models" / "image_encoder", ip_ckpt=root / "models" / IP_CKPT_NAME)


def save_sd15_models(root: str | os.PathLike, shape: SD15Shape = TINY) -> SD15Paths:
    """SD 1.5 pipeline folder `sd15/` and h94's `models/image_encoder` + `models/ip-adapter-plus_sd15.bin` under `root`."""
    paths = _paths(Path(root))
    pipe = build_sd15_pipeline(shape)
    pipe.save_pretrained(paths.sd15_dir)
    build_image_encoder(shape).save_pretrained(paths.image_encoder_dir)
    save_ip_checkpoint(paths.ip_ckpt, pipe.unet, shape)
    return paths


def save_model_configs(root: str | os.PathLike, shape: SD15Shape = FULL) -> SD15Paths:
    """Only the model_index.json and config.json files of an SD 1.5 folder and the image encoder (config-only readers)."""
    paths = _paths(Path(root))
    save_configs(
        {
            paths.sd15_dir / "model_index.json": {"_class_name": StableDiffusionPipeline.__name__},
            paths.sd15_dir / "unet": {"_class_name": "UNet2DConditionModel", **shape.unet},
            paths.sd15_dir / "vae": {"_class_name": "AutoencoderKL", **shape.vae},
            paths.sd15_dir / "text_encoder": CLIPTextConfig(**shape.text_encoder).to_dict(),
            paths.image_encoder_dir: CLIPVisionConfig(**shape.image_encoder).to_dict(),
        }
    )
    return paths


def load_pipeline(sd15_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(str(sd15_dir), dtype=dtype, local_files_only=True)
