"""The trainer's models: the frozen encoders, the denoiser with its trainable IP-Adapter layers, and their checkpoints.

What trains is the family's adapter (`base_models.TrainableAdapter`): the `to_k_ip` / `to_v_ip`
layers behind a frozen Resampler for SDXL and SD 1.5, the projection and the k/v layers of XLabs'
adapter for FLUX. The denoiser's frozen weights are held in the compute dtype (no per-step casts)
while the adapter stays in fp32 for the optimizer. What differs between base models (components,
prompt encoding, latents, added conditioning, the adapter and its files) is asked of the
`base_models` family.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from base_models import BaseModelFamily, Objective, TrainableAdapter, family_of
from base_models.family import Tensors
from common.errors import BadInputError
from common.hub import resolve_folder
from common.training_state import TrainedWeights
from ip_adapter.image_encoder import load_image_encoder

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
        return self.family.image_features(self.image_encoder, clip_pixels)

    def prompts(self, token_ids: Tensors) -> Tensors:
        return self.family.encode_prompts(self.text_encoders, token_ids)

    def encode_text(self, prompts: list[str]) -> Tensors:
        return self.prompts(self.family.tokenize(self.tokenizers, prompts))


class IPAdapterTrainingModel(nn.Module):
    """The denoiser with its family's trainable adapter (`base_models.TrainableAdapter`); forward takes pair-level inputs."""

    def __init__(self, family: BaseModelFamily, unet: nn.Module, adapter: TrainableAdapter, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.family = family
        self.unet = unet
        for index, module in enumerate(adapter.frozen):  # moved and wrapped with the model (the UNet families' Resampler)
            self.add_module("image_proj_model" if index == 0 else f"frozen_{index}", module)
        self.compute_dtype = compute_dtype
        # Held outside the module tree (the adapter's layers are already the denoiser's submodules): its
        # parameters keep the denoiser's names.
        self.__dict__["adapter"] = adapter

    @property
    def adapter_modules(self) -> nn.ModuleDict:
        """The trainable layers: what the optimizer steps, checkpoints hold and validation samples with."""
        return self.adapter.modules

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
        hidden_states, added = self.adapter.condition(prompt_embeds, image_features, added, dtype)
        return self.family.denoise(self.unet, noisy_latents.to(dtype), timesteps, hidden_states, added)


@dataclass
class TrainingModels:
    family: BaseModelFamily
    model: IPAdapterTrainingModel
    encoders: FrozenEncoders | None  # None once a feature cache has replaced them
    objective: Objective
    model_dir: Path


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
    adapter = family.load_adapter(unet, image_encoder.config, ip_adapter_path)

    for module in (unet, vae, *text_encoders, *adapter.frozen):
        module.eval().requires_grad_(False)
    # A full-precision copy taken before the cast to the compute dtype: the trainable adapter restarts
    # from it (casting it down and back up would round it).
    adapter_state = cpu_state(adapter.modules)
    unet.to(device, unet_dtype or weight_dtype)
    adapter.modules.to(torch.float32).requires_grad_(True)
    adapter.modules.load_state_dict(adapter_state)
    adapter.place(device, weight_dtype)
    vae.to(device, torch.float32)
    for encoder in text_encoders:
        encoder.to(device, weight_dtype)
    encoders = FrozenEncoders(family, vae, image_encoder, text_encoders, tokenizers)
    model = IPAdapterTrainingModel(family, unet, adapter, weight_dtype)
    return TrainingModels(family, model, encoders, objective, model_dir)


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of a module's tensors, unaffected by later `.to(dtype)` calls."""
    return {key: tensor.detach().to("cpu", copy=True) for key, tensor in module.state_dict().items()}


def frozen_adapter_copy(model: IPAdapterTrainingModel) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable weights: the frozen reference policy of `image_dpo`."""
    return {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def trained_state(model: IPAdapterTrainingModel) -> dict[str, torch.Tensor]:
    """The trainable layers' tensors as detached CPU copies (an unsharded model; a sharded run gathers them)."""
    return cpu_state(model.adapter_modules)


def save_adapter_checkpoint(
    directory: str | os.PathLike, model: IPAdapterTrainingModel, trained: dict[str, torch.Tensor] | None = None
) -> Path:
    """The family's public adapter files (`TrainableAdapter.checkpoint_files`, half precision) in `directory`."""
    directory = Path(directory)
    model.adapter.save_checkpoint(directory, trained if trained is not None else trained_state(model))
    return directory


def adapter_weights(
    model: IPAdapterTrainingModel,
    trained: Callable[[], dict[str, torch.Tensor]] | None = None,
    load: Callable[[nn.Module, dict[str, torch.Tensor]], None] | None = None,
) -> TrainedWeights:
    """A training state's weights: the adapter (and what it runs frozen) as loaded, full precision, in the family's layout.

    Only these: the frozen denoiser's gigabytes never change. `trained` gives the layers' full tensors
    (default: `trained_state`; a sharded run passes what it gathered on every process), `load` puts a
    full state into them (default: a strict `load_state_dict`; a sharded run keeps each process's shard).
    """

    def save(path: Path) -> None:
        model.adapter.save_state(path, trained() if trained is not None else trained_state(model))

    def restore(path: Path) -> None:
        state = model.adapter.read_state(path)
        if load is not None:
            load(model.adapter_modules, state)
        else:
            model.adapter_modules.load_state_dict(state, strict=True)

    return TrainedWeights(ADAPTER_STATE_NAME, save, restore)
