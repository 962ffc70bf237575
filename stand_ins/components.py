"""Configs and builders the SDXL and SD 1.5 stand-ins share: VAE, CLIP text and vision configs, the
offline CLIP tokenizer, the Stable Diffusion noise schedule, and the IP-Adapter-Plus parts (CLIP ViT-H
image encoder, Resampler, a checkpoint in the public h94 layout)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any, Protocol

import clip
import torch
from torch import nn
from transformers import CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection

from ip_adapter.attention_processor import install_ip_adapter
from ip_adapter.checkpoint import save_ip_adapter
from ip_adapter.resampler import Resampler

NUM_TOKENS = 16
# The training noise schedule of every Stable Diffusion release (SD 1.x and SDXL alike).
SD_NOISE_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


class AdapterShape(Protocol):
    """What the IP-Adapter-Plus builders read from a family's shape: the UNet, image encoder and Resampler configs."""

    unet: dict[str, Any]
    image_encoder: dict[str, Any]
    resampler: dict[str, Any]


def vae_config(channels: tuple[int, ...], **extra: Any) -> dict[str, Any]:
    return dict(
        block_out_channels=channels,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        **extra,
    )


def text_config(hidden: int, layers: int, heads: int, act: str = "gelu") -> dict[str, Any]:
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


def vision_config(hidden: int, layers: int, heads: int, patch: int, projection: int) -> dict[str, Any]:
    return dict(
        hidden_size=hidden,
        intermediate_size=4 * hidden if hidden > 32 else 37,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        image_size=224,
        patch_size=patch,
        projection_dim=projection,
    )


# h94/IP-Adapter/models/image_encoder (CLIP ViT-H/14), the encoder of both Plus checkpoints PatchDPO uses.
TINY_VIT_H = vision_config(32, 3, 4, patch=32, projection=32)
FULL_VIT_H = vision_config(1280, 32, 16, patch=14, projection=1024)


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


def build_image_encoder(shape: AdapterShape, seed: int = 1) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**shape.image_encoder)).eval()


def build_resampler(shape: AdapterShape, seed: int = 2) -> Resampler:
    """The Plus image projection: 64-wide heads, ff_mult 4 and `shape.resampler`'s dim/depth/heads."""
    torch.manual_seed(seed)
    return Resampler(
        dim_head=64,
        num_queries=NUM_TOKENS,
        embedding_dim=shape.image_encoder["hidden_size"],
        output_dim=shape.unet["cross_attention_dim"],
        ff_mult=4,
        **shape.resampler,
    )


def save_ip_checkpoint(path: str | os.PathLike, unet: nn.Module, shape: AdapterShape, seed: int = 3) -> Path:
    """An IP-Adapter-Plus checkpoint in the public layout whose image branch is far from identity."""
    adapter_modules = install_ip_adapter(unet, num_tokens=NUM_TOKENS)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter_modules.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return save_ip_adapter(path, build_resampler(shape), adapter_modules, dtype=torch.float32)


def save_configs(configs: dict[Path, dict[str, Any]]) -> None:
    """Write each `config.json` (or the named `.json`) without weights: what config-only readers (the memory plan) need."""
    for target, config in configs.items():
        path = target if target.suffix == ".json" else target / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2, default=list))
