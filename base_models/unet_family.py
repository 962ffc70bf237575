"""What the UNet families (SDXL, SD 1.5) share: a `UNet2DConditionModel` trained with a DDPM objective, CLIP text
encoders, a scaled VAE, and the h94 IP-Adapter-Plus layers on every cross-attention processor."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTokenizer

from common.errors import BadInputError
from ip_adapter.attention_processor import install_ip_adapter

from .family import BaseModelFamily, Objective, Tensors


class DDPMObjective(Objective):
    """Noise and a uniform timestep per pair; the target is the noise (epsilon) or the velocity (v-prediction)."""

    def __init__(self, scheduler: DDPMScheduler, source: Path) -> None:
        if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise BadInputError(
                f"{source}/scheduler: prediction_type {scheduler.config.prediction_type!r} is not trainable here; expected epsilon or v_prediction"
            )
        self.scheduler = scheduler

    def draw(
        self, noise_seeds: torch.Tensor, latent_shape: torch.Size, device: torch.device, noise_offset: float | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Drawn by CPU generators and then moved to `device`: a pair's numbers are the same on every device type, and no
        CUDA generator is needed (it needs a driver, which the fake-CUDA rehearsal has not); a few latents per step."""
        noises, timesteps = [], []
        for seed in noise_seeds.tolist():
            generator = torch.Generator().manual_seed(seed)
            noise = torch.randn(latent_shape, generator=generator)
            if noise_offset:
                noise += noise_offset * torch.randn((latent_shape[0], 1, 1), generator=generator)
            noises.append(noise)
            timesteps.append(torch.randint(0, self.scheduler.config.num_train_timesteps, (), generator=generator))
        return torch.stack(noises).to(device), torch.stack(timesteps).to(device)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.scheduler.config.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(latents, noise, timesteps)


class UNetFamily(BaseModelFamily):
    """A UNet family; subclasses name their text encoders and what the UNet reads beside cross-attention."""

    #: Text-encoder sub-folder -> its transformers class, in the order their hidden states are concatenated.
    text_encoders: ClassVar[dict[str, type]]
    tokenizer_folders: ClassVar[tuple[str, ...]]

    def load_denoiser(self, folder: Path, variant: str | None) -> nn.Module:
        return UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True, variant=variant)

    def load_vae(self, folder: Path, variant: str | None) -> nn.Module:
        return AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True, variant=variant)

    def load_text(self, folder: Path, variant: str | None) -> tuple[tuple, tuple[nn.Module, ...]]:
        encoders = tuple(
            cls.from_pretrained(folder, subfolder=sub, local_files_only=True, variant=variant) for sub, cls in self.text_encoders.items()
        )
        tokenizers = tuple(CLIPTokenizer.from_pretrained(folder, subfolder=sub, local_files_only=True) for sub in self.tokenizer_folders)
        return tokenizers, encoders

    def load_objective(self, folder: Path) -> Objective:
        return DDPMObjective(DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True), folder)

    def tokenize(self, tokenizers: tuple, prompts: Sequence[str]) -> Tensors:
        return {
            field: tokenizer(
                list(prompts), max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
            ).input_ids
            for field, tokenizer in zip(self.token_fields, tokenizers)
        }

    def text_components(self, tokenizers: tuple, text_encoders: tuple[nn.Module, ...]) -> dict[str, Any]:
        return {**dict(zip(self.text_encoders, text_encoders)), **dict(zip(self.tokenizer_folders, tokenizers))}

    def latent_scale(self, vae_config: Mapping[str, Any]) -> int:
        return 2 ** (len(vae_config["block_out_channels"]) - 1)

    def native_image_size(self, read_config: Callable[[str], dict[str, Any]]) -> int:
        """The UNet's sample size in pixels, the size diffusers' pipelines generate at when given none."""
        return read_config("unet/config.json")["sample_size"] * self.latent_scale(read_config("vae/config.json"))

    @torch.no_grad()
    def encode_latents(self, vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(vae.device, torch.float32)
        return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor

    def install_adapter(self, denoiser: nn.Module, num_tokens: int) -> nn.ModuleDict:
        return install_ip_adapter(denoiser, num_tokens=num_tokens)

    def denoise(
        self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, hidden_states: torch.Tensor, added: Tensors | None
    ) -> torch.Tensor:
        return denoiser(noisy, timesteps, hidden_states, added_cond_kwargs=added).sample

    def plan_models(self, read_config: Callable[[str], dict[str, Any]]) -> tuple[nn.Module, nn.Module, list[nn.Module]]:
        unet = UNet2DConditionModel.from_config(read_config("unet/config.json"))
        vae = AutoencoderKL.from_config(read_config("vae/config.json"))
        encoders = [cls(CLIPTextConfig(**read_config(f"{sub}/config.json"))) for sub, cls in self.text_encoders.items()]
        return unet, vae, encoders
