"""Stable Diffusion 1.5: one CLIP text encoder (its final hidden states, as the pipeline and h94's IP-Adapter training
read them) and no added conditioning; the h94 `ip-adapter-plus_sd15.bin` Resampler (dim 768, 12 heads, 16 queries)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers import StableDiffusionPipeline
from torch import nn
from transformers import CLIPTextModel

from ip_adapter.ip_adapter import IPAdapterPlus

from .family import Tensors
from .unet_family import UNetFamily


class SD15(UNetFamily):
    name = "SD 1.5"
    pipeline_class_name = "StableDiffusionPipeline"
    components = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    native_resolution = 512
    fresh_resampler = dict(dim=768, depth=4, dim_head=64, heads=12, num_queries=16, ff_mult=4)
    text_encoders = {"text_encoder": CLIPTextModel}
    tokenizer_folders = ("tokenizer",)
    token_fields = ("input_ids",)
    prompt_fields = ("prompt_embeds",)

    @torch.no_grad()
    def encode_prompts(self, text_encoders: tuple[nn.Module, ...], token_ids: Mapping[str, torch.Tensor]) -> Tensors:
        """prompt_embeds (N, 77, D): the encoder's last hidden states."""
        (text_encoder,) = text_encoders
        return {"prompt_embeds": text_encoder(token_ids["input_ids"].to(text_encoder.device))[0]}

    def added_conditioning(
        self, prompt: Mapping[str, torch.Tensor], reference_size: torch.Tensor, generated_size: torch.Tensor, resolution: int
    ) -> None:
        return None

    def ip_adapter_class(self) -> type:
        return IPAdapterPlus

    def pipeline_class(self) -> type:
        return StableDiffusionPipeline

    def example_added_conditioning(self, denoiser: nn.Module, rows: int, dtype: torch.dtype, device: torch.device) -> None:
        return None
