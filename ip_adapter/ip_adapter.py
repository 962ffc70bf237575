"""`IPAdapterPlus` (SD 1.5) and `IPAdapterPlusXL` (SDXL): a diffusers pipeline conditioned on
reference images through IP-Adapter-Plus, named as in the official IP-Adapter code.

The wrapper installs our decoupled cross-attention into the pipeline's UNet and feeds image tokens
by appending them to the prompt embeddings, so the stock diffusers denoising loop, schedulers and
guidance run unchanged and one batch may hold rows of different subjects. The families differ only
in the pipeline class and what its prompt encoder returns (SDXL adds pooled embeddings).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from torch import nn

from common.errors import BadInputError
from common.flags import DEFAULT_NEGATIVE_PROMPT

from .attention_processor import adapter_modules_of, install_ip_adapter, set_ip_adapter_scale
from .checkpoint import Checkpoint, load_adapter_state, load_ip_adapter_checkpoint, naming_file
from .image_encoder import encode_image_features, load_image_encoder, preprocess_clip_images
from .resampler import Resampler

DEFAULT_PROMPT = "best quality, high quality"

ImageInput = Image.Image | Sequence[Image.Image] | Sequence[Sequence[Image.Image]]
Generators = torch.Generator | Sequence[torch.Generator] | None


def as_groups(images: ImageInput) -> list[list[Image.Image]]:
    """One group per output row; a group of several images is one subject seen several times."""
    if isinstance(images, Image.Image):
        return [[images]]
    groups = [[item] if isinstance(item, Image.Image) else list(item) for item in images]
    if not groups or any(not group for group in groups):
        raise ValueError("expected a PIL image, a list of images or a list of non-empty image lists")
    return groups


class ImagePromptAdapter(ABC):
    """What every generation wrapper offers (`IPAdapterPlus`, `IPAdapterPlusXL`, `ip_adapter.flux_generation.FluxIPAdapter`):
    image conditioning of reference rows (`get_image_embeds`), images from it at a per-call scale
    (`generate_from_tokens`), the official `generate`, and the denoiser the speed flags act on."""

    #: Steps of `generate` when none are given.
    default_num_inference_steps: ClassVar[int] = 30
    device: torch.device

    @property
    @abstractmethod
    def denoiser(self) -> nn.Module:
        """The pipeline's denoiser (UNet or transformer), for `ip_adapter.speed.apply_speed_settings`."""

    @abstractmethod
    def get_image_embeds(self, images: ImageInput) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) image conditioning, one row per reference group."""

    @torch.inference_mode()
    def generate_from_tokens(
        self,
        cond_tokens: torch.Tensor,
        uncond_tokens: torch.Tensor,
        prompts: Sequence[str],
        negative_prompts: Sequence[str],
        generators: Generators = None,
        num_inference_steps: int | None = None,
        *,
        scale: float,
        **pipeline_kwargs,
    ) -> Any:
        """One image per row at IP-Adapter scale `scale` (`num_inference_steps` defaults to the family's).

        The scale is an argument of every call (set on the processors just before denoising), so a
        call never depends on an earlier one. Pass one generator per row to make each image
        independent of batching. The pipeline's other arguments (`height`, `guidance_scale`,
        `output_type`, ...) pass through; the result is the pipeline's `images`.
        """
        rows = len(prompts)
        if not (cond_tokens.shape[0] == uncond_tokens.shape[0] == len(negative_prompts) == rows):
            raise BadInputError(
                f"batch rows disagree: {cond_tokens.shape[0]} image conditioning rows, {uncond_tokens.shape[0]} unconditional "
                f"rows, {rows} prompts, {len(negative_prompts)} negative prompts"
            )
        generator = list(generators) if isinstance(generators, Sequence) else generators
        steps = num_inference_steps or self.default_num_inference_steps
        return self._denoise(cond_tokens, uncond_tokens, list(prompts), list(negative_prompts), generator, steps, scale, pipeline_kwargs)

    @abstractmethod
    def _denoise(
        self,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        prompts: list[str],
        negative_prompts: list[str],
        generator: torch.Generator | list[torch.Generator] | None,
        num_inference_steps: int,
        scale: float,
        pipeline_kwargs: dict[str, Any],
    ) -> Any:
        """The pipeline call for rows `generate_from_tokens` checked agree."""

    def generate(
        self,
        pil_image: ImageInput,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        scale: float = 1.0,
        num_samples: int = 4,
        seed: int | None = None,
        num_inference_steps: int | None = None,
        **pipeline_kwargs,
    ) -> list[Image.Image]:
        """`num_samples` images per reference row, drawn from one generator seeded with `seed` (the official signature);
        `num_inference_steps` defaults to the family's (`default_num_inference_steps`)."""
        cond, uncond = self.get_image_embeds(pil_image)
        rows = cond.shape[0]

        def per_row(text: str | Sequence[str] | None, default: str) -> list[str]:
            texts = [text or default] * rows if text is None or isinstance(text, str) else list(text)
            if len(texts) != rows:
                raise ValueError(f"got {len(texts)} prompts for {rows} reference rows")
            return [t for t in texts for _ in range(num_samples)]

        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        return self.generate_from_tokens(
            cond.repeat_interleave(num_samples, dim=0),
            uncond.repeat_interleave(num_samples, dim=0),
            per_row(prompt, DEFAULT_PROMPT),
            per_row(negative_prompt, DEFAULT_NEGATIVE_PROMPT),
            generator,
            num_inference_steps,
            scale=scale,
            **pipeline_kwargs,
        )


class IPAdapterPlus(ImagePromptAdapter):
    """A UNet pipeline + IP-Adapter-Plus (CLIP ViT-H penultimate features -> Resampler -> image tokens).

    This class drives SD 1.5 (`StableDiffusionPipeline`); a family whose pipeline encodes prompts
    differently overrides `pipeline_class` and `_prompt_inputs`.
    """

    pipeline_class: ClassVar[type[DiffusionPipeline]] = StableDiffusionPipeline

    def __init__(
        self,
        pipe: DiffusionPipeline,
        image_encoder_path: str | os.PathLike,
        ip_ckpt: str | os.PathLike | Checkpoint,
        device: torch.device | str | None = None,
        num_tokens: int = 16,
        checkpoint_file: str | os.PathLike | None = None,
    ) -> None:
        """`ip_ckpt` is a checkpoint file, or its already-loaded sections (to validate it before the pipeline loads), read from
        `checkpoint_file` (named by every error about them)."""
        if not isinstance(pipe, self.pipeline_class):
            raise TypeError(f"{type(self).__name__} needs a diffusers {self.pipeline_class.__name__}, got {type(pipe).__name__}")
        checkpoint, source = self._read(ip_ckpt, checkpoint_file)
        self.device = torch.device(device) if device is not None else pipe.unet.device
        self.pipe = pipe.to(self.device)
        self.dtype = pipe.unet.dtype
        self.num_tokens = num_tokens

        self.image_encoder = load_image_encoder(image_encoder_path, self.device, self.dtype)
        with naming_file(source):
            self.image_proj_model = Resampler(**self._resampler_config(checkpoint["image_proj"]))
        self.adapter_modules = install_ip_adapter(pipe.unet, num_tokens=num_tokens)
        load_adapter_state(self.image_proj_model, self.adapter_modules, checkpoint, source)
        self.image_proj_model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.adapter_modules.to(self.device, self.dtype)

    @classmethod
    def around(cls, pipe: DiffusionPipeline, image_encoder: nn.Module, image_proj_model: nn.Module, num_tokens: int = 16) -> IPAdapterPlus:
        """Wrap a pipeline whose UNet already holds the IP-Adapter layers (e.g. the UNet being trained): nothing is loaded or copied."""
        model = cls.__new__(cls)
        model.pipe, model.device, model.num_tokens = pipe, pipe.unet.device, num_tokens
        model.dtype = next(image_encoder.parameters()).dtype
        model.image_encoder, model.image_proj_model = image_encoder, image_proj_model
        model.adapter_modules = adapter_modules_of(pipe.unet)
        return model

    @property
    def denoiser(self) -> nn.Module:
        return self.pipe.unet

    @staticmethod
    def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
        """The checked sections of an IP-Adapter-Plus checkpoint file (what `__init__` and `load_checkpoint` accept loaded)."""
        return load_ip_adapter_checkpoint(path)

    def load_checkpoint(self, ip_ckpt: str | os.PathLike | Checkpoint, checkpoint_file: str | os.PathLike | None = None) -> None:
        """Swap in another IP-Adapter(-Plus) checkpoint of the same shapes: the pipeline and encoder stay loaded."""
        checkpoint, source = self._read(ip_ckpt, checkpoint_file)
        load_adapter_state(self.image_proj_model, self.adapter_modules, checkpoint, source)

    @staticmethod
    def _read(
        ip_ckpt: str | os.PathLike | Checkpoint, checkpoint_file: str | os.PathLike | None
    ) -> tuple[Checkpoint, str | os.PathLike | None]:
        """The sections and the file they come from."""
        if isinstance(ip_ckpt, dict):
            return ip_ckpt, checkpoint_file
        return load_ip_adapter_checkpoint(ip_ckpt), ip_ckpt

    def _resampler_config(self, image_proj: dict[str, torch.Tensor]) -> dict[str, int]:
        config = Resampler.config_from_state_dict(image_proj)
        expected = {
            "num_queries": self.num_tokens,
            "embedding_dim": self.image_encoder.config.hidden_size,
            "output_dim": self.pipe.unet.config.cross_attention_dim,
        }
        for key, value in expected.items():
            if config[key] != value:
                raise BadInputError(f"checkpoint image_proj has {key}={config[key]}, but this pipeline/encoder needs {value}")
        return config

    @torch.inference_mode()
    def get_image_embeds(self, images: ImageInput) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens (N, num_tokens, C) and the unconditional tokens of an all-zero CLIP input.

        A row built from several images averages their tokens (DreamBench's original setting).
        """
        groups = as_groups(images)
        pixels = preprocess_clip_images([image for group in groups for image in group]).to(self.device, self.dtype)
        tokens = self.image_proj_model(encode_image_features(self.image_encoder, pixels))
        cond = torch.stack([chunk.mean(dim=0) for chunk in tokens.split([len(g) for g in groups])])
        uncond = self.image_proj_model(encode_image_features(self.image_encoder, torch.zeros_like(pixels[:1])))
        return cond, uncond.expand(len(groups), -1, -1)

    def _denoise(
        self,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        prompts: list[str],
        negative_prompts: list[str],
        generator: torch.Generator | list[torch.Generator] | None,
        num_inference_steps: int,
        scale: float,
        pipeline_kwargs: dict[str, Any],
    ) -> Any:
        """Image tokens appended to each row's prompt embeddings: every row carries its own subject."""
        encoded = self.pipe.encode_prompt(
            prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=negative_prompts
        )
        prompt_embeds, negative_embeds, prompt_kwargs = self._prompt_inputs(encoded)
        set_ip_adapter_scale(self.pipe.unet, scale)
        return self.pipe(
            prompt_embeds=torch.cat([prompt_embeds, cond.to(self.device, prompt_embeds.dtype)], dim=1),
            negative_prompt_embeds=torch.cat([negative_embeds, uncond.to(self.device, prompt_embeds.dtype)], dim=1),
            num_inference_steps=num_inference_steps,
            generator=generator,
            **prompt_kwargs,
            **pipeline_kwargs,
        ).images

    @staticmethod
    def _prompt_inputs(encoded: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """The text tokens of the prompts and negative prompts from `pipe.encode_prompt`'s outputs, and any further
        pipeline inputs those outputs hold."""
        prompt_embeds, negative_embeds = encoded
        return prompt_embeds, negative_embeds, {}


class IPAdapterPlusXL(IPAdapterPlus):
    """SDXL + IP-Adapter-Plus: the prompt encoder also gives pooled embeddings, passed through to the pipeline."""

    pipeline_class = StableDiffusionXLPipeline

    @staticmethod
    def _prompt_inputs(encoded: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        prompt_embeds, negative_embeds, pooled, negative_pooled = encoded
        return prompt_embeds, negative_embeds, {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}
