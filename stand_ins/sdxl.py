"""Random-weight SDXL + IP-Adapter-Plus stand-ins, saved in the real on-disk layouts.

No pretrained weights can be downloaded where this project is tested, so the tests, the offline
demo and the speed benchmarks build models from configs and run every script through the same
`from_pretrained` / checkpoint-file paths a user takes with the real weights. Three shapes:
`TINY` (~2M-parameter UNet with SDXL's structure, for tests), `MID` (a CPU benchmark proxy) and
`FULL` (the published SDXL / CLIP ViT-H / IP-Adapter-Plus configs, for GPU benchmarks). The
tokenizers are the real CLIP BPE shipped with openai-clip. The parts SD 1.5 shares live in
`stand_ins.components`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig

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
    vision_config,
)


@dataclass(frozen=True)
class ModelShape:
    """Constructor arguments of every component; `cross_attention_dim` = sum of the text widths."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any]
    image_encoder: dict[str, Any]
    resampler: dict[str, Any] = field(default_factory=dict)


def _unet(channels, heads, layers, cross_dim, time_dim, pooled_dim, groups=32, **extra) -> dict[str, Any]:
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(channels) - 1)
    return dict(
        block_out_channels=channels,
        attention_head_dim=heads,
        transformer_layers_per_block=layers,
        down_block_types=down,
        up_block_types=tuple(name.replace("Down", "Up") for name in reversed(down)),
        layers_per_block=2,
        in_channels=4,
        out_channels=4,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled_dim,
        cross_attention_dim=cross_dim,
        norm_num_groups=groups,
        **extra,
    )


TINY = ModelShape(
    unet=_unet((32, 64), (2, 4), (1, 2), cross_dim=64, time_dim=8, pooled_dim=32, groups=1, sample_size=32),
    vae=vae_config((32, 64), sample_size=128),
    text_encoder=text_config(32, 3, 4),
    text_encoder_2=text_config(32, 3, 4),
    image_encoder=TINY_VIT_H,
    # Depth 4, ff_mult 4 and 64-wide heads as the public file, so diffusers' converter accepts it.
    resampler=dict(dim=64, depth=4, heads=1),
)
MID = ModelShape(
    unet=_unet((64, 128, 256), (1, 2, 4), (1, 1, 2), cross_dim=256, time_dim=32, pooled_dim=128, sample_size=32),
    vae=vae_config((32, 64, 64, 64), sample_size=256),
    text_encoder=text_config(128, 4, 2, act="quick_gelu"),
    text_encoder_2=text_config(128, 4, 2),
    image_encoder=vision_config(256, 6, 4, patch=14, projection=256),
    resampler=dict(dim=256, depth=4, heads=4),
)
FULL = ModelShape(
    unet=_unet((320, 640, 1280), (5, 10, 20), (1, 2, 10), cross_dim=2048, time_dim=256, pooled_dim=1280, sample_size=128),
    vae=vae_config((128, 256, 512, 512), sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    text_encoder=text_config(768, 12, 12, act="quick_gelu"),
    text_encoder_2=text_config(1280, 32, 20),
    image_encoder=FULL_VIT_H,
    resampler=dict(dim=1280, depth=4, heads=20),
)
SHAPES = {"tiny": TINY, "mid": MID, "full": FULL}


def build_sdxl_pipeline(shape: ModelShape = TINY, seed: int = 0) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    scheduler = EulerDiscreteScheduler(**SD_NOISE_SCHEDULE, timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**shape.vae),
        text_encoder=CLIPTextModel(CLIPTextConfig(**shape.text_encoder)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**shape.text_encoder_2)),
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        unet=UNet2DConditionModel(**shape.unet),
        scheduler=scheduler,
    )


@dataclass(frozen=True)
class ModelPaths:
    sdxl_dir: Path
    image_encoder_dir: Path
    ip_ckpt: Path


def save_sdxl_models(root: str | os.PathLike, shape: ModelShape = TINY) -> ModelPaths:
    """SDXL pipeline folder, CLIP vision folder and IP-Adapter-Plus `.bin` under `root`."""
    root = Path(root)
    pipe = build_sdxl_pipeline(shape)
    pipe.save_pretrained(root / "sdxl")
    build_image_encoder(shape).save_pretrained(root / "image_encoder")
    ckpt = save_ip_checkpoint(root / "ip-adapter-plus.bin", pipe.unet, shape)
    return ModelPaths(sdxl_dir=root / "sdxl", image_encoder_dir=root / "image_encoder", ip_ckpt=ckpt)


def save_model_configs(root: str | os.PathLike, shape: ModelShape = FULL) -> ModelPaths:
    """Only the model_index.json and config.json files of an SDXL folder and an image-encoder folder (what `patchdpo.memory_plan` reads)."""
    root = Path(root)
    configs = {
        root / "sdxl" / "model_index.json": {"_class_name": StableDiffusionXLPipeline.__name__},
        root / "sdxl" / "unet": {"_class_name": "UNet2DConditionModel", **shape.unet},
        root / "sdxl" / "vae": {"_class_name": "AutoencoderKL", **shape.vae},
        root / "sdxl" / "text_encoder": CLIPTextConfig(**shape.text_encoder).to_dict(),
        root / "sdxl" / "text_encoder_2": CLIPTextConfig(**shape.text_encoder_2).to_dict(),
        root / "image_encoder": CLIPVisionConfig(**shape.image_encoder).to_dict(),
    }
    save_configs(configs)
    return ModelPaths(sdxl_dir=root / "sdxl", image_encoder_dir=root / "image_encoder", ip_ckpt=root / "no-checkpoint")


def load_pipeline(sdxl_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir), dtype=dtype, local_files_only=True)
