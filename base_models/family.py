"""What differs between base-model families, behind one interface the trainer, the memory plan and the scripts ask.

A family is stateless: it says which components a pipeline folder holds and how to load them, how
prompts become conditioning tensors, how pixels become latents, what the denoiser is trained to
predict (`Objective`), how the denoiser is called with the pair's conditioning, and where the
IP-Adapter layers go. Nothing outside `base_models/` branches on the family.
"""

from __future__ import annotations

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


#: Conditioning tensors by name (e.g. "prompt_embeds", "pooled_prompt_embeds"): what a cache stores and a batch carries.
Tensors = dict[str, torch.Tensor]


class BaseModelFamily(ABC):
    """One base-model family (SDXL, SD 1.5, ...); `base_models.family_of` picks it from a folder's model_index.json."""

    #: Short name used in messages and docs.
    name: ClassVar[str]
    #: `model_index.json`'s `_class_name` of the family's diffusers pipeline.
    pipeline_class_name: ClassVar[str]
    #: The pipeline sub-folders the trainer loads.
    components: ClassVar[tuple[str, ...]]
    #: The resolution the family was trained at (the default image size of its pipeline).
    native_resolution: ClassVar[int]
    #: The public IP-Adapter-Plus checkpoint's Resampler (without its input/output widths), used when training from scratch.
    fresh_resampler: ClassVar[dict[str, int]]
    #: Names of the token-id tensors `tokenize` returns and of the prompt tensors `encode_prompts` returns.
    token_fields: ClassVar[tuple[str, ...]]
    prompt_fields: ClassVar[tuple[str, ...]]

    def with_official_time_ids(self) -> BaseModelFamily:
        """The family fed the reference training's SDXL time ids (`--official_time_ids`); only SDXL has time ids."""
        raise BadInputError(
            f"--official_time_ids is the SDXL reference training's time-id layout; a {self.name} model has no time ids: drop the flag"
        )

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

    @abstractmethod
    def latent_scale(self, vae_config: Mapping[str, Any]) -> int:
        """Pixels per latent cell: the quality maps of a `resolution` image are `resolution // latent_scale` square."""

    @abstractmethod
    def encode_latents(self, vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Float32 training latents of pixels in [-1, 1] (the VAE runs in float32)."""

    @abstractmethod
    def install_adapter(self, denoiser: nn.Module, num_tokens: int) -> nn.ModuleDict:
        """Put IP-attention layers into `denoiser`; the returned modules' state dict is the checkpoint's "ip_adapter" section."""

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
