"""Tiny random SDXL + IP-Adapter-Plus models saved in their real on-disk layouts.

Every script is tested through the same `from_pretrained` / checkpoint-file paths a user takes
with the real weights; only the sizes differ. The UNet keeps SDXL's structure (text_time added
conditioning, two text encoders, cross-attention in the lower blocks) at ~2M parameters.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import clip
import pytest
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

from ip_adapter import Resampler, install_ip_adapter, save_ip_adapter

CROSS_ATTENTION_DIM = 64
TEXT_HIDDEN = 32
IMAGE_ENCODER_HIDDEN = 32
NUM_TOKENS = 16


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


def _text_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, vocab_size=49408, hidden_size=TEXT_HIDDEN,
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, projection_dim=TEXT_HIDDEN,
        max_position_embeddings=77, hidden_act="gelu",
    )


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + TEXT_HIDDEN, cross_attention_dim=CROSS_ATTENTION_DIM,
        norm_num_groups=1,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, sample_size=128,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(_text_config()),
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=scheduler,
    )


def build_tiny_image_encoder(seed: int = 1) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=IMAGE_ENCODER_HIDDEN, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
        image_size=224, patch_size=32, projection_dim=IMAGE_ENCODER_HIDDEN,
    )
    return CLIPVisionModelWithProjection(config).eval()


def build_tiny_resampler(seed: int = 2) -> Resampler:
    """Depth 4, ff_mult 4 and 64-wide heads as the public file, so diffusers' converter accepts it."""
    torch.manual_seed(seed)
    return Resampler(
        dim=64, depth=4, dim_head=64, heads=1, num_queries=NUM_TOKENS, embedding_dim=IMAGE_ENCODER_HIDDEN,
        output_dim=CROSS_ATTENTION_DIM, ff_mult=4,
    )


def write_tiny_ip_checkpoint(path: str | os.PathLike, unet: UNet2DConditionModel, seed: int = 3) -> Path:
    """An IP-Adapter-Plus checkpoint in the public layout whose image branch is far from identity."""
    adapter_modules = install_ip_adapter(unet, num_tokens=NUM_TOKENS)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter_modules.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return save_ip_adapter(path, build_tiny_resampler(), adapter_modules, dtype=torch.float32)


@dataclass(frozen=True)
class TinyModels:
    sdxl_dir: Path
    image_encoder_dir: Path
    ip_ckpt: Path


def save_tiny_models(root: str | os.PathLike) -> TinyModels:
    root = Path(root)
    pipe = build_tiny_sdxl_pipeline()
    pipe.save_pretrained(root / "sdxl")
    build_tiny_image_encoder().save_pretrained(root / "image_encoder")
    ckpt = write_tiny_ip_checkpoint(root / "ip-adapter-plus_tiny.bin", build_tiny_sdxl_pipeline().unet)
    return TinyModels(sdxl_dir=root / "sdxl", image_encoder_dir=root / "image_encoder", ip_ckpt=ckpt)


def load_tiny_pipeline(sdxl_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir), dtype=dtype, local_files_only=True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return save_tiny_models(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tiny_models: TinyModels) -> Path:
    return tiny_models.sdxl_dir


@pytest.fixture(scope="session")
def tiny_image_encoder_dir(tiny_models: TinyModels) -> Path:
    return tiny_models.image_encoder_dir


@pytest.fixture(scope="session")
def tiny_ip_ckpt(tiny_models: TinyModels) -> Path:
    return tiny_models.ip_ckpt
