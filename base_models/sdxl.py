"""SDXL: two CLIP text encoders (penultimate hidden states concatenated, pooled projection of the second) and size
time ids, the UNet's added conditioning.

Time ids, and the reference training's layout (`official_time_ids=True`)
----------------------------------------------------------------------
The UNet reads `added_cond_kwargs["time_ids"]` as one row of six numbers per latent,
`(original_h, original_w, crop_top, crop_left, target_h, target_w)`, taking whatever it is given
in flattened order, six per latent row.

The official `train_patchdpo.py` stacks per pair `original_size = [[H_ref, W_ref], [H_gen, W_gen]]`,
`crop = [[0, 0], [0, 0]]`, `target = [[R, R], [R, R]]` into (B, 2, 2) tensors and concatenates
them along dim 1, giving (B, 6, 2). Flattened, pair i contributes twelve numbers
`H_ref W_ref H_gen W_gen 0 0 0 0 R R R R`, which the UNet cuts into two rows:

    row 2i   = (H_ref_i, W_ref_i, H_gen_i, W_gen_i, 0, 0)   original=(H_ref, W_ref), crop=(H_gen, W_gen), target=(0, 0)
    row 2i+1 = (0, 0, R, R, R, R)                           original=(0, 0), crop=(R, R), target=(R, R)

while the latent batch is ordered `[ref_0 .. ref_{B-1}, gen_0 .. gen_{B-1}]`, so the rows go to
the wrong images and every row is scrambled. The released PatchDPO weights were trained with these
ids, so `official_time_ids=True` reproduces them exactly for comparisons; the default gives each
latent its own `(H, W, 0, 0, R, R)`, what SDXL was trained with and what the pipeline feeds at
inference.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from ip_adapter.ip_adapter import IPAdapterPlusXL

from .family import Tensors
from .unet_family import UNetFamily


def pair_time_ids(reference_sizes: torch.Tensor, generated_sizes: torch.Tensor, resolution: int, official: bool = False) -> torch.Tensor:
    """(2B, 6) time ids for the latent batch `[references; generated]` from (B, 2) original (H, W) sizes (module docstring)."""
    if reference_sizes.shape != generated_sizes.shape or reference_sizes.ndim != 2 or reference_sizes.shape[1] != 2:
        raise ValueError(
            f"expected (B, 2) original sizes for both halves, got {tuple(reference_sizes.shape)} and {tuple(generated_sizes.shape)}"
        )
    reference_sizes = reference_sizes.float()
    generated_sizes = generated_sizes.float()
    batch = reference_sizes.shape[0]
    if official:
        original = torch.stack([reference_sizes, generated_sizes], dim=1)  # (B, 2, 2)
        crop = torch.zeros_like(original)
        target = torch.full_like(original, float(resolution))
        # The UNet flattens time ids and takes six per latent row; a reshape is that same reading.
        return torch.cat([original, crop, target], dim=1).reshape(2 * batch, 6)
    original = torch.cat([reference_sizes, generated_sizes], dim=0)  # (2B, 2)
    crop = torch.zeros_like(original)
    target = torch.full_like(original, float(resolution))
    return torch.cat([original, crop, target], dim=1)


class SDXL(UNetFamily):
    name = "SDXL"
    pipeline_class_name = "StableDiffusionXLPipeline"
    components = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    native_resolution = 1024
    #: `ip-adapter-plus_sdxl_vit-h.bin`'s Resampler.
    fresh_resampler = dict(dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, ff_mult=4)
    text_encoders = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    tokenizer_folders = ("tokenizer", "tokenizer_2")
    token_fields = ("input_ids", "input_ids_2")
    prompt_fields = ("prompt_embeds", "pooled_prompt_embeds")

    def __init__(self, official_time_ids: bool = False) -> None:
        self.official_time_ids = official_time_ids

    def with_official_time_ids(self) -> SDXL:
        return SDXL(official_time_ids=True)

    @torch.no_grad()
    def encode_prompts(self, text_encoders: tuple[nn.Module, ...], token_ids: Mapping[str, torch.Tensor]) -> Tensors:
        """prompt_embeds (N, 77, D1 + D2): both encoders' penultimate states; pooled_prompt_embeds (N, D2): the second's projection."""
        text_encoder, text_encoder_2 = text_encoders
        hidden = text_encoder(token_ids["input_ids"].to(text_encoder.device), output_hidden_states=True).hidden_states[-2]
        output_2 = text_encoder_2(token_ids["input_ids_2"].to(text_encoder_2.device), output_hidden_states=True)
        return {"prompt_embeds": torch.cat([hidden, output_2.hidden_states[-2]], dim=-1), "pooled_prompt_embeds": output_2.text_embeds}

    def added_conditioning(
        self, prompt: Mapping[str, torch.Tensor], reference_size: torch.Tensor, generated_size: torch.Tensor, resolution: int
    ) -> Tensors:
        pooled = prompt["pooled_prompt_embeds"]
        time_ids = pair_time_ids(reference_size, generated_size, resolution, self.official_time_ids).to(pooled.device)
        return {"text_embeds": pooled.repeat(2, 1), "time_ids": time_ids}

    def ip_adapter_class(self) -> type:
        return IPAdapterPlusXL

    def pipeline_class(self) -> type:
        return StableDiffusionXLPipeline

    def example_added_conditioning(self, denoiser: nn.Module, rows: int, dtype: torch.dtype, device: torch.device) -> Tensors:
        config: Any = denoiser.config
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        return {"text_embeds": torch.randn(rows, pooled, dtype=dtype, device=device), "time_ids": torch.randn(rows, 6, device=device)}
