"""FLUX.1 (dev layout): a `FluxTransformer2DModel` trained with rectified flow, CLIP-L pooled + T5 prompts,
packed latents with position ids, a guidance value, and XLabs' IP-Adapter.

What differs from the UNet families, and where it is decided:

* prompts: `prompt_embeds` are T5's last hidden states (N, L, 4096), padded to
  `max_sequence_length` tokens (512, `FluxPipeline`'s default, so training sees what sampling
  feeds); `pooled_prompt_embeds` are CLIP-L's pooled output (N, 768), exactly as
  `FluxPipeline.encode_prompt` computes them;
* latents: `(z - shift_factor) * scaling_factor` (`base_models.flux_latents`), posterior mean;
* objective: `base_models.flow_matching` (target eps - x0, diffusers' FLUX DreamBooth defaults);
* the forward: latents (N, C, h, w) are packed into (h/2)(w/2) tokens with their image ids, text
  ids are zeros, the timestep is t / 1000, the guidance value goes to a guidance-distilled model,
  and the prediction is unpacked back to (N, C, h, w), so the losses and the `(2B, 1, h, w)` patch
  weights work on the latent grid unchanged (see `flux_latents` for why weights are per position);
* the adapter: diffusers' FLUX IP-Adapter modules in XLabs' checkpoint layout
  (`ip_adapter.flux_ip_adapter`), fed CLIP vision `image_embeds` (`added["image_embeds"]`) instead
  of the Resampler tokens of the h94 adapters.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from common.errors import BadInputError
from common.hub import resolve_file
from ip_adapter.flux_generation import FLUX_GUIDANCE_SCALE, FLUX_NUM_INFERENCE_STEPS, FluxIPAdapter
from ip_adapter.flux_ip_adapter import fresh_flux_ip_adapter, ip_adapter_kwargs, load_flux_ip_adapter

from .family import BaseModelFamily, Objective, Tensors
from .flow_matching import TIMESTEP_SCALE, FlowMatchingObjective, FlowMatchingSettings, guidance
from .flux_adapter import XLabsAdapter, adapter_modules
from .flux_latents import denormalize_latents, encode_latents, latent_image_ids, pack_latents, unpack_latents, vae_stride

#: `FluxPipeline.default_sample_size`: latent cells per image edge when no height/width is given (1024 px on FLUX's VAE).
FLUX_DEFAULT_SAMPLE_SIZE = 128
#: CLIP ViT-L/14's `image_embeds` width, the image encoder of XLabs' adapter.
CLIP_L_EMBED_DIM = 768
#: Image tokens of a fresh adapter: XLabs' v1 file has 4.
FRESH_TOKENS = 4

logger = logging.getLogger(__name__)


class FluxFamily(BaseModelFamily):
    name = "FLUX.1"
    denoiser_name = "transformer"
    pipeline_class_name = "FluxPipeline"
    components = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    denoiser_component = "transformer"
    trainable_adapter = XLabsAdapter
    native_resolution = 1024
    #: `FluxPipeline.__call__`'s defaults (diffusers 0.42), the values diffusers' FLUX docs use for FLUX.1-dev: 28 steps,
    #: embedded (distilled) guidance 3.5, no true classifier-free guidance.
    sampling_defaults = {"num_inference_steps": FLUX_NUM_INFERENCE_STEPS, "guidance_scale": FLUX_GUIDANCE_SCALE}
    #: FLUX's adapter has no Resampler: a Linear + LayerNorm projection (`ip_adapter.flux_ip_adapter`).
    fresh_resampler: dict[str, int] = {}
    token_fields = ("input_ids", "input_ids_2")
    prompt_fields = ("prompt_embeds", "pooled_prompt_embeds")

    def __init__(self, settings: FlowMatchingSettings | None = None, max_sequence_length: int = 512) -> None:
        self.settings = settings or FlowMatchingSettings()
        self.max_sequence_length = max_sequence_length

    def with_flow_matching(self, flags: Mapping[str, Any]) -> FluxFamily:
        """Unset flags keep diffusers' train_dreambooth_flux.py defaults (`FlowMatchingSettings`)."""
        try:
            return FluxFamily(replace(self.settings, **flags), self.max_sequence_length)
        except ValueError as error:
            raise BadInputError(f"{error}: fix the flag") from None

    def objective_settings(self) -> dict[str, Any]:
        return asdict(self.settings)

    def load_denoiser(self, folder: Path, variant: str | None) -> nn.Module:
        return FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", local_files_only=True, variant=variant)

    def load_vae(self, folder: Path, variant: str | None) -> nn.Module:
        return AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True, variant=variant)

    def load_text(self, folder: Path, variant: str | None) -> tuple[tuple, tuple[nn.Module, ...]]:
        tokenizers = (
            CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True),
            T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_2", local_files_only=True),
        )
        encoders = (
            CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True, variant=variant),
            T5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2", local_files_only=True, variant=variant),
        )
        return tokenizers, encoders

    def load_objective(self, folder: Path) -> Objective:
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
        return FlowMatchingObjective(scheduler, self.settings)

    def tokenize(self, tokenizers: tuple, prompts: Sequence[str]) -> Tensors:
        clip, t5 = tokenizers
        pad = dict(padding="max_length", truncation=True, return_tensors="pt")
        return {
            "input_ids": clip(list(prompts), max_length=clip.model_max_length, **pad).input_ids,
            "input_ids_2": t5(list(prompts), max_length=self.max_sequence_length, **pad).input_ids,
        }

    @torch.no_grad()
    def encode_prompts(self, text_encoders: tuple[nn.Module, ...], token_ids: Mapping[str, torch.Tensor]) -> Tensors:
        """prompt_embeds (N, L, D_T5): T5's last hidden states; pooled_prompt_embeds (N, D_CLIP): CLIP's pooled output."""
        clip, t5 = text_encoders
        pooled = clip(token_ids["input_ids"].to(clip.device), output_hidden_states=False).pooler_output
        return {"prompt_embeds": t5(token_ids["input_ids_2"].to(t5.device))[0], "pooled_prompt_embeds": pooled}

    def native_image_size(self, read_config: Callable[[str], dict[str, Any]]) -> int:
        """`FluxPipeline`'s default edge: its `default_sample_size` (128, fixed in the pipeline) latent cells of the VAE's stride."""
        return FLUX_DEFAULT_SAMPLE_SIZE * self.latent_scale(read_config("vae/config.json"))

    def image_size_multiple(self, read_config: Callable[[str], dict[str, Any]]) -> int:
        """Two latent cells: the transformer packs 2x2 of them into a token (`FluxPipeline` would silently shrink another size)."""
        return 2 * self.latent_scale(read_config("vae/config.json"))

    def latent_scale(self, vae_config: Mapping[str, Any]) -> int:
        return vae_stride(vae_config["block_out_channels"])

    def encode_latents(self, vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return encode_latents(vae, pixels)

    def vae_latents(self, latents: torch.Tensor, vae_config: Mapping[str, Any], height: int, width: int) -> torch.Tensor:
        """FluxPipeline's packed, normalised latents (N, L, 4C) unpacked and denormalised, as the pipeline decodes them."""
        scale = self.latent_scale(vae_config)
        grid = unpack_latents(latents, height // scale, width // scale)
        return denormalize_latents(grid, vae_config["shift_factor"], vae_config["scaling_factor"])

    def install_adapter(self, denoiser: nn.Module, num_tokens: int, image_embed_dim: int = CLIP_L_EMBED_DIM) -> nn.ModuleDict:
        """A fresh XLabs-layout adapter (zero k/v, seeded projection); its modules: the projection and each double block's processor."""
        fresh_flux_ip_adapter(denoiser, image_embed_dim, num_tokens)
        return adapter_modules(denoiser)

    def load_adapter(self, denoiser: nn.Module, image_encoder_config: Any, ip_adapter_path: str | os.PathLike | None) -> XLabsAdapter:
        """XLabs' adapter from its file, or fresh (`ip_adapter.flux_ip_adapter`: zero k/v, seeded projection); all of it trains."""
        width = image_encoder_config.projection_dim
        if ip_adapter_path is None:
            logger.warning(
                "no --pretrained_ip_adapter_path: a fresh XLabs-layout adapter (%d image tokens): to_k_ip/to_v_ip zero, so the image "
                "branch adds nothing at step 0; the projection Linear drawn with nn.Linear's default law from seed 0, its LayerNorm the "
                "identity; projection and k/v all train",
                FRESH_TOKENS,
            )
            return XLabsAdapter(self.install_adapter(denoiser, FRESH_TOKENS, width))
        load_flux_ip_adapter(denoiser, resolve_file(ip_adapter_path, "--pretrained_ip_adapter_path"))
        reads = denoiser.encoder_hid_proj.image_projection_layers[0].image_embeds.in_features
        if reads != width:
            raise BadInputError(
                f"--pretrained_ip_adapter_path {ip_adapter_path}: its projection reads {reads}-wide CLIP image_embeds, "
                f"--image_encoder_path gives {width}: pass the image encoder the adapter was trained with (CLIP ViT-L/14 for XLabs')"
            )
        return XLabsAdapter(adapter_modules(denoiser))

    @torch.no_grad()
    def image_features(self, image_encoder: nn.Module, clip_pixels: torch.Tensor) -> torch.Tensor:
        """CLIP's projected `image_embeds` (N, D), what FluxPipeline's IP-Adapter feeds the projection."""
        return image_encoder(clip_pixels.to(image_encoder.device, image_encoder.dtype)).image_embeds

    def added_conditioning(
        self, prompt: Mapping[str, torch.Tensor], reference_size: torch.Tensor, generated_size: torch.Tensor, resolution: int
    ) -> Tensors:
        """CLIP's pooled prompt for both halves; FLUX has no size conditioning (the sizes are not read)."""
        return {"pooled_projections": prompt["pooled_prompt_embeds"].repeat(2, 1)}

    def denoise(
        self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, hidden_states: torch.Tensor, added: Tensors | None
    ) -> torch.Tensor:
        """The velocity prediction (N, C, h, w) for latents `noisy` (N, C, h, w), T5 `hidden_states` and `added`
        (`pooled_projections`, and `image_embeds` (N, D) for the IP-Adapter)."""
        rows, _, height, width = noisy.shape
        device, dtype = noisy.device, noisy.dtype
        image = added.get("image_embeds")
        prediction = denoiser(
            hidden_states=pack_latents(noisy),
            encoder_hidden_states=hidden_states.to(dtype),
            pooled_projections=added["pooled_projections"].to(dtype),
            timestep=timesteps / TIMESTEP_SCALE,
            guidance=guidance(self.settings, rows, denoiser.config.guidance_embeds, device),
            img_ids=latent_image_ids(height, width, device, dtype),
            txt_ids=torch.zeros(hidden_states.shape[1], 3, device=device, dtype=dtype),
            joint_attention_kwargs=None if image is None else ip_adapter_kwargs(image.to(dtype)),
            return_dict=False,
        )[0]
        return unpack_latents(prediction, height, width)

    def text_components(self, tokenizers: tuple, text_encoders: tuple[nn.Module, ...]) -> dict[str, Any]:
        return {
            "text_encoder": text_encoders[0],
            "text_encoder_2": text_encoders[1],
            "tokenizer": tokenizers[0],
            "tokenizer_2": tokenizers[1],
        }

    def pipeline_class(self) -> type:
        return FluxPipeline

    def ip_adapter_class(self) -> type:
        return FluxIPAdapter

    def plan_models(self, read_config: Callable[[str], dict[str, Any]]) -> tuple[nn.Module, nn.Module, list[nn.Module]]:
        transformer = FluxTransformer2DModel.from_config(read_config("transformer/config.json"))
        vae = AutoencoderKL.from_config(read_config("vae/config.json"))
        encoders = [
            CLIPTextModel(CLIPTextConfig(**read_config("text_encoder/config.json"))),
            T5EncoderModel(T5Config(**read_config("text_encoder_2/config.json"))),
        ]
        return transformer, vae, encoders

    def example_added_conditioning(self, denoiser: nn.Module, rows: int, dtype: torch.dtype, device: torch.device) -> Tensors:
        added = {"pooled_projections": torch.randn(rows, denoiser.config.pooled_projection_dim, dtype=dtype, device=device)}
        if denoiser.encoder_hid_proj is not None:
            width = denoiser.encoder_hid_proj.image_projection_layers[0].image_embeds.in_features
            added["image_embeds"] = torch.randn(rows, width, dtype=dtype, device=device)
        return added

    def example_prompt_embeds(self, denoiser: nn.Module, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        width = denoiser.config.joint_attention_dim
        return torch.randn(rows, self.max_sequence_length, width, dtype=dtype, device=device)

    def example_token_ids(self, rows: int, device: torch.device) -> Tensors:
        """CLIP's 77 tokens and T5's `max_sequence_length`."""
        lengths = {"input_ids": 77, "input_ids_2": self.max_sequence_length}
        return {name: torch.randint(0, 100, (rows, length), device=device) for name, length in lengths.items()}
