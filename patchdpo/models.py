"""The trainer's models: the frozen encoders, the denoiser with its trainable IP-Adapter layers, and their checkpoints.

Only the IP-Adapter projections `to_k_ip` / `to_v_ip` train. The Resampler is frozen and sits
upstream of them, so its tokens are computed without autograd; the denoiser's frozen weights are
held in the compute dtype (no per-step casts) while the adapter stays in fp32 for the optimizer.
What differs between base models (which components, prompt encoding, latents, added conditioning)
is asked of the `base_models` family.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from base_models import BaseModelFamily, Objective, family_of
from base_models.family import Tensors
from common.errors import BadInputError
from common.hub import resolve_file, resolve_folder
from common.training_state import TrainedWeights
from ip_adapter.attention_processor import adapter_modules_of
from ip_adapter.checkpoint import load_adapter_state, load_ip_adapter_checkpoint, load_strict, naming_file, save_ip_adapter
from ip_adapter.image_encoder import encode_image_features, load_image_encoder
from ip_adapter.resampler import Resampler

logger = logging.getLogger(__name__)

ADAPTER_STATE_NAME = "ip_adapter_state.safetensors"


@dataclass
class FrozenEncoders:
    """The frozen encoders; a step whose batch carries cached outputs keeps only those it still runs (`kept_with_cache`)."""

    family: BaseModelFamily
    vae: nn.Module | None
    image_encoder: nn.Module | None
    text_encoders: tuple[nn.Module, ...] | None
    tokenizers: tuple

    def kept_with_cache(self, clip_per_step: bool) -> FrozenEncoders:
        """What a step runs once the cache holds the other outputs: the image encoder when CLIP crops are drawn per step."""
        return FrozenEncoders(self.family, None, self.image_encoder if clip_per_step else None, None, self.tokenizers)

    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.family.encode_latents(self.vae, pixels)

    @torch.no_grad()
    def image_features(self, clip_pixels: torch.Tensor) -> torch.Tensor:
        return encode_image_features(self.image_encoder, clip_pixels)

    def prompts(self, token_ids: Tensors) -> Tensors:
        return self.family.encode_prompts(self.text_encoders, token_ids)

    def encode_text(self, prompts: list[str]) -> Tensors:
        return self.prompts(self.family.tokenize(self.tokenizers, prompts))


class IPAdapterTrainingModel(nn.Module):
    """The denoiser with IP-Adapter layers plus the frozen Resampler; forward takes pair-level inputs."""

    def __init__(
        self,
        family: BaseModelFamily,
        unet: nn.Module,
        image_proj_model: Resampler,
        compute_dtype: torch.dtype,
        image_proj_state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.family = family
        self.unet = unet
        self.image_proj_model = image_proj_model
        self.compute_dtype = compute_dtype
        # Held outside the module tree (the processors are already the UNet's submodules): looked up once,
        # not by walking the UNet's processors at every access; the state-dict keys stay the UNet's.
        self.__dict__["adapter_modules"] = adapter_modules_of(unet)
        # The frozen Resampler's tensors as loaded: saved instead of its copy in the compute dtype, so a
        # bf16 or fp16 run writes back exactly the image_proj it started from.
        self.image_proj_state = image_proj_state if image_proj_state is not None else cpu_state(image_proj_model)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        image_features: torch.Tensor,
        prompt_embeds: torch.Tensor,
        added: Tensors | None,
    ) -> torch.Tensor:
        """The prediction for the 2B latents; the B per-pair conditionings (`added`: already 2B rows) are used twice."""
        dtype = self.compute_dtype
        with torch.no_grad():
            image_tokens = self.image_proj_model(image_features.to(dtype))
        hidden_states = torch.cat([prompt_embeds.to(dtype), image_tokens], dim=1).repeat(2, 1, 1)
        added = None if added is None else {name: tensor.to(dtype) for name, tensor in added.items()}
        return self.family.denoise(self.unet, noisy_latents.to(dtype), timesteps, hidden_states, added)


@dataclass
class TrainingModels:
    family: BaseModelFamily
    model: IPAdapterTrainingModel
    encoders: FrozenEncoders | None  # None once a feature cache has replaced them
    objective: Objective
    model_dir: Path


def _build_resampler(
    family: BaseModelFamily, ip_adapter_path: str | os.PathLike | None, embedding_dim: int, output_dim: int
) -> tuple[Resampler, dict | None]:
    if ip_adapter_path is None:
        logger.warning(
            "no --pretrained_ip_adapter_path: to_k_ip/to_v_ip start as copies of to_k/to_v and the Resampler is freshly "
            "initialised and stays frozen (only the adapter layers train)"
        )
        return Resampler(**family.fresh_resampler, embedding_dim=embedding_dim, output_dim=output_dim), None
    checkpoint = load_ip_adapter_checkpoint(resolve_file(ip_adapter_path, "--pretrained_ip_adapter_path"))
    with naming_file(ip_adapter_path):
        config = Resampler.config_from_state_dict(checkpoint["image_proj"])
        for key, expected in (("embedding_dim", embedding_dim), ("output_dim", output_dim)):
            if config[key] != expected:
                raise BadInputError(f"image_proj has {key}={config[key]}, but the {family.name} models here need {expected}")
    return Resampler.from_state_dict(checkpoint["image_proj"], ip_adapter_path), checkpoint


def load_training_models(
    model_dir: str | os.PathLike,
    image_encoder_dir: str | os.PathLike,
    ip_adapter_path: str | os.PathLike | None,
    device: torch.device | str,
    weight_dtype: torch.dtype,
    revision: str | None = None,
    variant: str | None = None,
    unet_dtype: torch.dtype | None = None,
    family: BaseModelFamily | None = None,
) -> TrainingModels:
    """Load the family's parts from a folder or a Hugging Face id (`common.hub`), install and initialise the adapter, freeze the rest.

    The frozen denoiser is held in `unet_dtype` (default `weight_dtype`; float32 is the official script's
    fp32 UNet under autocast, whose `unet.to(dtype)` is commented out). `family`: read from the folder when not given.
    """
    family = family or family_of(model_dir, revision=revision)
    model_dir = resolve_folder(model_dir, "--pretrained_model_name_or_path", revision, family.components, variant)
    for sub in family.components:
        if not (model_dir / sub).is_dir():
            raise BadInputError(f"{model_dir} has no {sub}/ folder; expected a {family.name} pipeline saved with save_pretrained")
    unet = family.load_denoiser(model_dir, variant)
    vae = family.load_vae(model_dir, variant)
    tokenizers, text_encoders = family.load_text(model_dir, variant)
    objective = family.load_objective(model_dir)
    image_encoder = load_image_encoder(image_encoder_dir, device, weight_dtype)

    resampler, checkpoint = _build_resampler(family, ip_adapter_path, image_encoder.config.hidden_size, unet.config.cross_attention_dim)
    adapter_modules = family.install_adapter(unet, resampler.num_queries)
    if checkpoint is not None:
        load_strict(adapter_modules, checkpoint["ip_adapter"], "ip_adapter", ip_adapter_path)

    for module in (unet, vae, *text_encoders, resampler):
        module.eval().requires_grad_(False)
    # Full-precision copies taken before the cast to the compute dtype: the trainable adapter restarts
    # from them (casting it down and back up would round it), the frozen Resampler is saved from them.
    adapter_state, image_proj_state = cpu_state(adapter_modules), cpu_state(resampler)
    unet.to(device, unet_dtype or weight_dtype)
    adapter_modules.to(torch.float32).requires_grad_(True)
    adapter_modules.load_state_dict(adapter_state)
    resampler.to(device, weight_dtype)
    vae.to(device, torch.float32)
    for encoder in text_encoders:
        encoder.to(device, weight_dtype)
    encoders = FrozenEncoders(family, vae, image_encoder, text_encoders, tokenizers)
    model = IPAdapterTrainingModel(family, unet, resampler, weight_dtype, image_proj_state)
    return TrainingModels(family, model, encoders, objective, model_dir)


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of a module's tensors, unaffected by later `.to(dtype)` calls."""
    return {key: tensor.detach().to("cpu", copy=True) for key, tensor in module.state_dict().items()}


def frozen_adapter_copy(model: IPAdapterTrainingModel) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable weights: the frozen reference policy of `image_dpo`."""
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def save_adapter_checkpoint(directory: str | os.PathLike, model: IPAdapterTrainingModel) -> Path:
    """`model.bin` and `model.safetensors` (fp16, public IP-Adapter layout) in `directory`."""
    directory = Path(directory)
    save_ip_adapter(directory / "model.bin", model.image_proj_state, model.adapter_modules)
    save_ip_adapter(directory / "model.safetensors", model.image_proj_state, model.adapter_modules)
    return directory


def adapter_weights(model: IPAdapterTrainingModel) -> TrainedWeights:
    """A training state's weights: the adapter and the Resampler as loaded, full precision, in the IP-Adapter format.

    Only these: the frozen denoiser's gigabytes never change. Loading them back also makes the state's
    Resampler tensors the ones every later checkpoint saves.
    """

    def save(path: Path) -> None:
        save_ip_adapter(path, model.image_proj_state, model.adapter_modules, dtype=None)

    def load(path: Path) -> None:
        checkpoint = load_ip_adapter_checkpoint(path)
        load_adapter_state(model.image_proj_model, model.adapter_modules, checkpoint, path)
        model.image_proj_state = {key: tensor.clone() for key, tensor in checkpoint["image_proj"].items()}

    return TrainedWeights(ADAPTER_STATE_NAME, save, load)
