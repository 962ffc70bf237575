"""What the UNet families (SDXL, SD 1.5) share: a `UNet2DConditionModel` trained with a DDPM objective, CLIP text
encoders, a scaled VAE, and the h94 IP-Adapter-Plus layers on every cross-attention processor."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTokenizer

from common.errors import BadInputError
from common.hub import resolve_file
from ip_adapter.attention_processor import install_ip_adapter
from ip_adapter.checkpoint import load_adapter_state, load_ip_adapter_checkpoint, load_strict, naming_file, save_ip_adapter
from ip_adapter.image_encoder import encode_image_features
from ip_adapter.resampler import Resampler

from .family import BaseModelFamily, Objective, Tensors, TrainableAdapter

logger = logging.getLogger(__name__)


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


class PlusAdapter(TrainableAdapter):
    """h94's IP-Adapter-Plus: the frozen Resampler turns CLIP penultimate features into image tokens appended to the
    prompt's; only the `to_k_ip` / `to_v_ip` layers train. Checkpoints: `model.bin` and `model.safetensors` (h94's layout)."""

    checkpoint_files = ("model.bin", "model.safetensors")

    def __init__(self, resampler: Resampler, modules: nn.ModuleDict, image_proj_state: dict[str, torch.Tensor] | None = None) -> None:
        self.resampler = resampler
        self.modules = modules
        self.frozen = (resampler,)
        # The frozen Resampler's tensors as loaded: saved instead of its copy in the compute dtype, so a
        # bf16 or fp16 run writes back exactly the image_proj it started from.
        self.image_proj_state = image_proj_state if image_proj_state is not None else _cpu_state(resampler)

    def condition(
        self, prompt_embeds: torch.Tensor, image_features: torch.Tensor, added: Tensors | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, Tensors | None]:
        with torch.no_grad():
            image_tokens = self.resampler(image_features.to(dtype))
        hidden_states = torch.cat([prompt_embeds.to(dtype), image_tokens], dim=1).repeat(2, 1, 1)
        return hidden_states, None if added is None else {name: tensor.to(dtype) for name, tensor in added.items()}

    def save_checkpoint(self, directory: Path, trained: Mapping[str, torch.Tensor]) -> None:
        for name in self.checkpoint_files:
            save_ip_adapter(directory / name, self.image_proj_state, trained)

    def save_state(self, path: Path, trained: Mapping[str, torch.Tensor]) -> None:
        save_ip_adapter(path, self.image_proj_state, trained, dtype=None)

    def read_state(self, path: Path) -> dict[str, torch.Tensor]:
        """Loads the Resampler and the adapter layers strictly (one-line errors naming the file), returns the layers' state."""
        checkpoint = load_ip_adapter_checkpoint(path)
        load_adapter_state(self.resampler, self.modules, checkpoint, path)
        self.image_proj_state = {key: tensor.clone() for key, tensor in checkpoint["image_proj"].items()}
        return dict(checkpoint["ip_adapter"])


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: tensor.detach().to("cpu", copy=True) for key, tensor in module.state_dict().items()}


class UNetFamily(BaseModelFamily):
    """A UNet family; subclasses name their text encoders and what the UNet reads beside cross-attention."""

    denoiser_name = "UNet"
    denoiser_component = "unet"
    trainable_adapter = PlusAdapter
    #: Text-encoder sub-folder -> its transformers class, in the order their hidden states are concatenated.
    text_encoders: ClassVar[dict[str, type]]
    tokenizer_folders: ClassVar[tuple[str, ...]]
    #: The paper's sampling (30 steps, classifier-free guidance 5.0), for SDXL and SD 1.5 alike.
    sampling_defaults = {"num_inference_steps": 30, "guidance_scale": 5.0}

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

    def vae_latents(self, latents: torch.Tensor, vae_config: Mapping[str, Any], height: int, width: int) -> torch.Tensor:
        return latents / vae_config["scaling_factor"]

    @torch.no_grad()
    def encode_latents(self, vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(vae.device, torch.float32)
        return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor

    def install_adapter(self, denoiser: nn.Module, num_tokens: int) -> nn.ModuleDict:
        return install_ip_adapter(denoiser, num_tokens=num_tokens)

    def load_adapter(self, denoiser: nn.Module, image_encoder_config: Any, ip_adapter_path: str | os.PathLike | None) -> PlusAdapter:
        embedding_dim, output_dim = image_encoder_config.hidden_size, denoiser.config.cross_attention_dim
        if ip_adapter_path is None:
            logger.warning(
                "no --pretrained_ip_adapter_path: to_k_ip/to_v_ip start as copies of to_k/to_v and the Resampler is freshly "
                "initialised and stays frozen (only the adapter layers train)"
            )
            resampler = Resampler(**self.fresh_resampler, embedding_dim=embedding_dim, output_dim=output_dim)
            return PlusAdapter(resampler, self.install_adapter(denoiser, resampler.num_queries))
        checkpoint = load_ip_adapter_checkpoint(resolve_file(ip_adapter_path, "--pretrained_ip_adapter_path"))
        with naming_file(ip_adapter_path):
            config = Resampler.config_from_state_dict(checkpoint["image_proj"])
            for key, expected in (("embedding_dim", embedding_dim), ("output_dim", output_dim)):
                if config[key] != expected:
                    raise BadInputError(f"image_proj has {key}={config[key]}, but the {self.name} models here need {expected}")
        resampler = Resampler.from_state_dict(checkpoint["image_proj"], ip_adapter_path)
        modules = self.install_adapter(denoiser, resampler.num_queries)
        load_strict(modules, checkpoint["ip_adapter"], "ip_adapter", ip_adapter_path)
        return PlusAdapter(resampler, modules)

    def image_features(self, image_encoder: nn.Module, clip_pixels: torch.Tensor) -> torch.Tensor:
        """CLIP's penultimate hidden states (N, 257, D): what the Resampler reads."""
        return encode_image_features(image_encoder, clip_pixels)

    def denoise(
        self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, hidden_states: torch.Tensor, added: Tensors | None
    ) -> torch.Tensor:
        return denoiser(noisy, timesteps, hidden_states, added_cond_kwargs=added).sample

    def plan_models(self, read_config: Callable[[str], dict[str, Any]]) -> tuple[nn.Module, nn.Module, list[nn.Module]]:
        unet = UNet2DConditionModel.from_config(read_config("unet/config.json"))
        vae = AutoencoderKL.from_config(read_config("vae/config.json"))
        encoders = [cls(CLIPTextConfig(**read_config(f"{sub}/config.json"))) for sub, cls in self.text_encoders.items()]
        return unet, vae, encoders

    def example_prompt_embeds(self, denoiser: nn.Module, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.randn(rows, 77, denoiser.config.cross_attention_dim, dtype=dtype, device=device)
