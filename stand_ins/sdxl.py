"""Random-weight SDXL + IP-Adapter-Plus stand-ins, saved in the real on-disk layouts.

No pretrained weights can be downloaded where this project is tested, so the tests, the offline
demo and the speed benchmarks build models from configs and run every script through the same
`from_pretrained` / checkpoint-file paths a user takes with the real weights. Three shapes:
`TINY` (~2M-parameter UNet with SDXL's structure, for tests), `MID` (a CPU benchmark proxy) and
`FULL` (the published SDXL / CLIP ViT-H / IP-Adapter-Plus configs, for GPU benchmarks). The
tokenizers are the real CLIP BPE shipped with openai-clip.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import clip
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from ip_adapter.attention_processor import install_ip_adapter
from ip_adapter.checkpoint import save_ip_adapter
from ip_adapter.resampler import Resampler

NUM_TOKENS = 16


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


def _vae(channels, **extra) -> dict[str, Any]:
    return dict(
        block_out_channels=channels,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        **extra,
    )


def _text(hidden, layers, heads, act="gelu") -> dict[str, Any]:
    return dict(
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=4 * hidden if hidden > 32 else 37,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        projection_dim=hidden,
        max_position_embeddings=77,
        hidden_act=act,
    )


def _vision(hidden, layers, heads, patch, projection) -> dict[str, Any]:
    return dict(
        hidden_size=hidden,
        intermediate_size=4 * hidden if hidden > 32 else 37,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        image_size=224,
        patch_size=patch,
        projection_dim=projection,
    )


TINY = ModelShape(
    unet=_unet((32, 64), (2, 4), (1, 2), cross_dim=64, time_dim=8, pooled_dim=32, groups=1, sample_size=32),
    vae=_vae((32, 64), sample_size=128),
    text_encoder=_text(32, 3, 4),
    text_encoder_2=_text(32, 3, 4),
    image_encoder=_vision(32, 3, 4, patch=32, projection=32),
    # Depth 4, ff_mult 4 and 64-wide heads as the public file, so diffusers' converter accepts it.
    resampler=dict(dim=64, depth=4, heads=1),
)
MID = ModelShape(
    unet=_unet((64, 128, 256), (1, 2, 4), (1, 1, 2), cross_dim=256, time_dim=32, pooled_dim=128, sample_size=32),
    vae=_vae((32, 64, 64, 64), sample_size=256),
    text_encoder=_text(128, 4, 2, act="quick_gelu"),
    text_encoder_2=_text(128, 4, 2),
    image_encoder=_vision(256, 6, 4, patch=14, projection=256),
    resampler=dict(dim=256, depth=4, heads=4),
)
FULL = ModelShape(
    unet=_unet((320, 640, 1280), (5, 10, 20), (1, 2, 10), cross_dim=2048, time_dim=256, pooled_dim=1280, sample_size=128),
    vae=_vae((128, 256, 512, 512), sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    text_encoder=_text(768, 12, 12, act="quick_gelu"),
    text_encoder_2=_text(1280, 32, 20),
    image_encoder=_vision(1280, 32, 16, patch=14, projection=1024),
    resampler=dict(dim=1280, depth=4, heads=20),
)
SHAPES = {"tiny": TINY, "mid": MID, "full": FULL}


def build_clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A real CLIP BPE tokenizer from the vocabulary openai-clip ships (no download).

    `vocab`/`merges` are passed as Python objects: building it from file paths can silently
    produce a 3-token vocabulary with current transformers.
    """
    bpe_path = Path(clip.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    byte_symbols = list(clip.simple_tokenizer.bytes_to_unicode().values())
    tokens = byte_symbols + [symbol + "</w>" for symbol in byte_symbols] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def build_sdxl_pipeline(shape: ModelShape = TINY, seed: int = 0) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**shape.vae),
        text_encoder=CLIPTextModel(CLIPTextConfig(**shape.text_encoder)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**shape.text_encoder_2)),
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        unet=UNet2DConditionModel(**shape.unet),
        scheduler=scheduler,
    )


def build_image_encoder(shape: ModelShape = TINY, seed: int = 1) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**shape.image_encoder)).eval()


def build_resampler(shape: ModelShape = TINY, seed: int = 2) -> Resampler:
    torch.manual_seed(seed)
    return Resampler(
        dim_head=64,
        num_queries=NUM_TOKENS,
        embedding_dim=shape.image_encoder["hidden_size"],
        output_dim=shape.unet["cross_attention_dim"],
        ff_mult=4,
        **shape.resampler,
    )


def save_ip_checkpoint(path: str | os.PathLike, unet: UNet2DConditionModel, shape: ModelShape = TINY, seed: int = 3) -> Path:
    """An IP-Adapter-Plus checkpoint in the public layout whose image branch is far from identity."""
    adapter_modules = install_ip_adapter(unet, num_tokens=NUM_TOKENS)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter_modules.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return save_ip_adapter(path, build_resampler(shape), adapter_modules, dtype=torch.float32)


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
    """Only the config.json files (and model_index.json) of an SDXL folder and an image-encoder folder: what `patchdpo.memory_plan` reads."""
    root = Path(root)
    configs = {
        root / "sdxl" / "unet": {"_class_name": "UNet2DConditionModel", **shape.unet},
        root / "sdxl" / "vae": {"_class_name": "AutoencoderKL", **shape.vae},
        root / "sdxl" / "text_encoder": CLIPTextConfig(**shape.text_encoder).to_dict(),
        root / "sdxl" / "text_encoder_2": CLIPTextConfig(**shape.text_encoder_2).to_dict(),
        root / "image_encoder": CLIPVisionConfig(**shape.image_encoder).to_dict(),
    }
    for folder, config in configs.items():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config, indent=2, default=list))
    (root / "sdxl" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return ModelPaths(sdxl_dir=root / "sdxl", image_encoder_dir=root / "image_encoder", ip_ckpt=root / "no-checkpoint")


def load_pipeline(sdxl_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir), dtype=dtype, local_files_only=True)
