"""What differs between base-model families, behind one interface the trainer, the memory plan and the scripts ask.

A family is stateless: it says which components a pipeline folder holds and how to load them, how
prompts become conditioning tensors, how pixels become latents, what the denoiser is trained to
predict (`Objective`), how the denoiser is called with the pair's conditioning, and where the
IP-Adapter layers go. Nothing outside `base_models/` branches on the family.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from common.errors import BadInputError


class Objective(ABC):
    """The diffusion training objective: each pair's noise and timestep, the noisy input, the target (flow matching fits too).

    `draw` is keyed on the pair's `noise_seed`, so a pair's draw never depends on where it is trained.
    """

    @abstractmethod
    def draw(
        self, noise_seeds: torch.Tensor, latent_shape: torch.Size, device: torch.device, noise_offset: float | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise (B, *latent_shape), timesteps (B,)), pair i's from a generator seeded with `noise_seeds[i]`."""

    @abstractmethod
    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...

    def row_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """(N,) loss weights of each row's squared error by its timestep; None: all ones (the losses then skip the product)."""
        return None


#: Conditioning tensors by name (e.g. "prompt_embeds", "pooled_prompt_embeds"): what a cache stores and a batch carries.
Tensors = dict[str, torch.Tensor]


class TrainableAdapter(ABC):
    """The IP-Adapter a run trains, in its family's layout: which layers train, how the image reaches the denoiser, its files.

    `modules` are the trainable layers (what the optimizer steps and validation samples with); their
    state dict, gathered to full CPU tensors by the caller (a sharded run gathers on every process),
    is what `save_checkpoint` and `save_state` write. `frozen` are modules outside the denoiser the
    adapter runs without training them (the UNet families' Resampler).
    """

    modules: nn.ModuleDict
    frozen: tuple[nn.Module, ...] = ()
    #: What every `checkpoint-N/` holds for users, in the public layout of the family's adapter.
    checkpoint_files: ClassVar[tuple[str, ...]]

    def place(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Move the frozen modules to where and in what the step runs them."""
        for module in self.frozen:
            module.to(device, dtype)

    @abstractmethod
    def condition(
        self, prompt_embeds: torch.Tensor, image_features: torch.Tensor, added: Tensors | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, Tensors | None]:
        """(cross-attention hidden states, added conditioning) for the 2B latents, from B pairs' prompt and image features."""

    @abstractmethod
    def save_checkpoint(self, directory: Path, trained: Mapping[str, torch.Tensor]) -> None:
        """Write `checkpoint_files` into `directory` (half precision, as the public files) from the trained state."""

    @abstractmethod
    def save_state(self, path: Path, trained: Mapping[str, torch.Tensor]) -> None:
        """The training state's adapter file (full precision, the public layout's keys)."""

    @abstractmethod
    def read_state(self, path: Path) -> dict[str, torch.Tensor]:
        """The trained state (the `modules`' keys) of a `save_state` file; restores the frozen modules from it too."""


class BaseModelFamily(ABC):
    """One base-model family (SDXL, SD 1.5, ...); `base_models.family_of` picks it from a folder's model_index.json."""

    #: Short name used in messages and docs.
    name: ClassVar[str]
    #: `model_index.json`'s `_class_name` of the family's diffusers pipeline.
    pipeline_class_name: ClassVar[str]
    #: The pipeline sub-folders the trainer loads.
    components: ClassVar[tuple[str, ...]]
    #: The denoiser's name in the pipeline ("unet", "transformer").
    denoiser_component: ClassVar[str]
    #: The adapter a run trains; its first `checkpoint_files` entry is what generation reads from a `checkpoint-N/`.
    trainable_adapter: ClassVar[type[TrainableAdapter]]
    #: The resolution the family was trained at (the default image size of its pipeline).
    native_resolution: ClassVar[int]
    #: `--num_inference_steps` and `--guidance_scale` of the generating scripts when not given.
    sampling_defaults: ClassVar[dict[str, int | float]]
    #: The public IP-Adapter-Plus checkpoint's Resampler (without its input/output widths), used when training from scratch.
    fresh_resampler: ClassVar[dict[str, int]]
    #: What the memory plan calls the frozen denoiser in its rows ("UNet", "transformer").
    denoiser_name: ClassVar[str]
    #: Names of the token-id tensors `tokenize` returns and of the prompt tensors `encode_prompts` returns.
    token_fields: ClassVar[tuple[str, ...]]
    prompt_fields: ClassVar[tuple[str, ...]]

    def with_official_time_ids(self) -> BaseModelFamily:
        """The family fed the reference training's SDXL time ids (`--official_time_ids`); only SDXL has time ids."""
        raise BadInputError(
            f"--official_time_ids is the SDXL reference training's time-id layout; a {self.name} model has no time ids: drop the flag"
        )

    def with_flow_matching(self, flags: Mapping[str, Any]) -> BaseModelFamily:
        """The family trained with these flow-matching flags (`--weighting_scheme`, ...); only FLUX trains with flow matching."""
        if flags:
            given = " ".join(f"--{name}" for name in flags)
            raise BadInputError(f"{given}: FLUX's flow-matching settings; a {self.name} model trains with DDPM noise: drop them")
        return self

    def objective_settings(self) -> dict[str, Any] | None:
        """The objective's settings a resume must match beyond the flags every family records (None: nothing more)."""
        return None

    @abstractmethod
    def load_denoiser(self, folder: Path, variant: str | None) -> nn.Module: ...

    @abstractmethod
    def load_vae(self, folder: Path, variant: str | None) -> nn.Module: ...

    @abstractmethod
    def load_text(self, folder: Path, variant: str | None) -> tuple[tuple, tuple[nn.Module, ...]]:
        """(tokenizers, text encoders), frozen encoders on the CPU in their stored dtype."""

    @abstractmethod
    def load_objective(self, folder: Path) -> Objective: ...

    @abstractmethod
    def tokenize(self, tokenizers: tuple, prompts: Sequence[str]) -> Tensors:
        """(N, L) token ids per `token_fields` name, padded as the family's pipeline pads them."""

    @abstractmethod
    def encode_prompts(self, text_encoders: tuple[nn.Module, ...], token_ids: Mapping[str, torch.Tensor]) -> Tensors:
        """The prompt tensors per `prompt_fields` name; `prompt_embeds` (N, L, D) is what cross-attention reads."""

    @abstractmethod
    def native_image_size(self, read_config: Callable[[str], dict[str, Any]]) -> int:
        """The image edge the family's pipeline generates at by default, from the folder's configs (`read_config("unet/config.json")`)."""

    def image_size_multiple(self, read_config: Callable[[str], dict[str, Any]]) -> int:
        """What an image edge must be a multiple of beyond the 8 px every script asks (`common.checks.require_sampling_args`)."""
        return 1

    @abstractmethod
    def latent_scale(self, vae_config: Mapping[str, Any]) -> int:
        """Pixels per latent cell: the quality maps of a `resolution` image are `resolution // latent_scale` square."""

    @abstractmethod
    def vae_latents(self, latents: torch.Tensor, vae_config: Mapping[str, Any], height: int, width: int) -> torch.Tensor:
        """What the VAE decodes, from the latents the family's pipeline returns (`output_type="latent"`) for `height` x `width` images."""

    @abstractmethod
    def encode_latents(self, vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Float32 training latents of pixels in [-1, 1] (the VAE runs in float32)."""

    @abstractmethod
    def install_adapter(self, denoiser: nn.Module, num_tokens: int) -> nn.ModuleDict:
        """Put IP-attention layers into `denoiser`; the returned modules' state dict is the checkpoint's "ip_adapter" section."""

    @abstractmethod
    def load_adapter(self, denoiser: nn.Module, image_encoder_config: Any, ip_adapter_path: str | os.PathLike | None) -> TrainableAdapter:
        """Install the adapter into `denoiser`, from `--pretrained_ip_adapter_path` or fresh (logging how it starts)."""

    @abstractmethod
    def image_features(self, image_encoder: nn.Module, clip_pixels: torch.Tensor) -> torch.Tensor:
        """What the adapter reads of a reference image: the image encoder's output for (N, 3, 224, 224) CLIP pixels."""

    @abstractmethod
    def added_conditioning(
        self, prompt: Mapping[str, torch.Tensor], reference_size: torch.Tensor, generated_size: torch.Tensor, resolution: int
    ) -> Tensors | None:
        """What the denoiser reads beside the cross-attention tokens, for the 2B latents `[references; generated]`."""

    @abstractmethod
    def denoise(
        self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, hidden_states: torch.Tensor, added: Tensors | None
    ) -> torch.Tensor:
        """The denoiser's prediction for `noisy` given cross-attention `hidden_states` and `added` conditioning."""

    @abstractmethod
    def text_components(self, tokenizers: tuple, text_encoders: tuple[nn.Module, ...]) -> dict[str, Any]:
        """The pipeline's text components by their `model_index.json` names, to build a pipeline around loaded modules."""

    @abstractmethod
    def pipeline_class(self) -> type:
        """The diffusers pipeline that generates with this family."""

    @abstractmethod
    def ip_adapter_class(self) -> type:
        """The `ip_adapter` wrapper that generates with this family's pipeline and IP-Adapter-Plus."""

    @abstractmethod
    def plan_models(self, read_config: Callable[[str], dict[str, Any]]) -> tuple[nn.Module, nn.Module, list[nn.Module]]:
        """(denoiser, VAE, text encoders) built from the folder's configs alone, for `patchdpo.memory_plan`."""

    @abstractmethod
    def example_added_conditioning(self, denoiser: nn.Module, rows: int, dtype: torch.dtype, device: torch.device) -> Tensors | None:
        """Random `added` conditioning of the right shapes for `rows` latents on `device` (the memory plan's step)."""

    @abstractmethod
    def example_prompt_embeds(self, denoiser: nn.Module, rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Random `prompt_embeds` (rows, L, D) of the length `tokenize` pads to (the memory plan's step)."""

    def example_token_ids(self, rows: int, device: torch.device) -> Tensors:
        """Token ids of the lengths `tokenize` pads to (CLIP's 77), for the memory plan's per-step encoding."""
        return {name: torch.randint(0, 100, (rows, 77), device=device) for name in self.token_fields}
