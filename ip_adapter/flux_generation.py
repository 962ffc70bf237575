"""`FluxIPAdapter`: a diffusers `FluxPipeline` conditioned on reference images through XLabs' FLUX IP-Adapter,
with the interface of `IPAdapterPlus` (`get_image_embeds`, `generate_from_tokens`, `generate`, a per-call scale).

The adapter is diffusers' own (`ip_adapter.flux_ip_adapter` installs the modules
`FluxPipeline.load_ip_adapter` builds and loads XLabs' `ip_adapter.safetensors` into them), and the
image enters the stock pipeline call as `ip_adapter_image_embeds`, so the images are those of
`FluxPipeline.load_ip_adapter(...)` + `pipe(ip_adapter_image=...)` at the same seed
(tests/test_flux_flow.py checks it).

The image conditioning of a row is CLIP-L's `image_embeds` (N, 768): XLabs' adapter reads the
projected embedding, not the penultimate patch features of IP-Adapter-Plus. A row of several
references (DreamBench's original setting) averages their embeddings before the adapter's
projection, the FLUX counterpart of averaging the Plus image tokens. The unconditional embedding
is that of a black image, what `FluxPipeline` uses when given no negative image; it is read only
under true classifier-free guidance (`true_cfg_scale` > 1 with negative prompts). FLUX.1-dev is
guidance-distilled: by default it samples with the embedded `guidance_scale` and no negative pass,
so the negative prompts are then ignored, as in `FluxPipeline`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import FluxPipeline
from PIL import Image
from torch import nn

from common.errors import BadInputError

from .flux_ip_adapter import load_flux_ip_adapter_state, set_flux_ip_adapter_scale
from .image_encoder import load_image_encoder, preprocess_clip_images
from .ip_adapter import ImageInput, ImagePromptAdapter, as_groups
from .xlabs import image_tokens, read_xlabs_file

#: XLabs' adapter state: tensors under the keys of `ip_adapter.safetensors`.
XLabsState = dict[str, torch.Tensor]
#: `FluxPipeline.__call__`'s default number of steps (diffusers' FLUX.1-dev default).
FLUX_NUM_INFERENCE_STEPS = 28
#: `FluxPipeline.__call__`'s default embedded guidance (FLUX.1-dev is guidance-distilled).
FLUX_GUIDANCE_SCALE = 3.5


class FluxIPAdapter(ImagePromptAdapter):
    """FLUX.1 + XLabs' IP-Adapter (CLIP ViT-L/14 `image_embeds` -> Linear + LayerNorm -> image tokens in every double block)."""

    pipeline_class: ClassVar[type] = FluxPipeline
    default_num_inference_steps = FLUX_NUM_INFERENCE_STEPS

    def __init__(
        self,
        pipe: FluxPipeline,
        image_encoder_path: str | os.PathLike,
        ip_ckpt: str | os.PathLike | XLabsState,
        device: torch.device | str | None = None,
        checkpoint_file: str | os.PathLike | None = None,
    ) -> None:
        """`ip_ckpt` is an XLabs-layout file, or its tensors already read by `read_checkpoint` from `checkpoint_file`."""
        if not isinstance(pipe, self.pipeline_class):
            raise TypeError(f"{type(self).__name__} needs a diffusers FluxPipeline, got {type(pipe).__name__}")
        self.device = torch.device(device) if device is not None else pipe.transformer.device
        self.pipe = pipe.to(self.device)
        self.dtype = pipe.transformer.dtype
        self.image_encoder = load_image_encoder(image_encoder_path, self.device, self.dtype)
        self.load_checkpoint(ip_ckpt, checkpoint_file)

    @classmethod
    def around(cls, pipe: FluxPipeline, image_encoder: nn.Module, image_proj_model: nn.Module | None = None) -> FluxIPAdapter:
        """Wrap a pipeline whose transformer already holds the adapter (e.g. the one being trained): nothing is loaded or copied.

        FLUX's projection lives in the transformer (`encoder_hid_proj`); `image_proj_model`, if given, must be it."""
        if image_proj_model is not None and image_proj_model is not pipe.transformer.encoder_hid_proj:
            raise ValueError("a FLUX IP-Adapter's projection is the transformer's encoder_hid_proj; pass that or None")
        model = cls.__new__(cls)
        model.pipe, model.device, model.dtype = pipe, pipe.transformer.device, next(image_encoder.parameters()).dtype
        model.image_encoder = image_encoder
        model.num_tokens = pipe.transformer.encoder_hid_proj.image_projection_layers[0].num_image_text_embeds
        return model

    @property
    def denoiser(self) -> nn.Module:
        return self.pipe.transformer

    @staticmethod
    def read_checkpoint(path: str | os.PathLike) -> XLabsState:
        """The checked tensors of an XLabs-layout `ip_adapter.safetensors`."""
        return read_xlabs_file(path)

    def load_checkpoint(self, ip_ckpt: str | os.PathLike | XLabsState, checkpoint_file: str | os.PathLike | None = None) -> None:
        """Install the adapter from `ip_ckpt` (replacing any installed one); the pipeline and encoder stay loaded."""
        state, source = (ip_ckpt, checkpoint_file) if isinstance(ip_ckpt, dict) else (self.read_checkpoint(ip_ckpt), ip_ckpt)
        width = state["ip_adapter_proj_model.proj.weight"].shape[1]
        if width != self.image_encoder.config.projection_dim:
            raise BadInputError(
                f"{source}: the adapter reads {width}-wide CLIP image_embeds, the image encoder gives "
                f"{self.image_encoder.config.projection_dim}: pass the encoder it was trained with (openai/clip-vit-large-patch14)"
            )
        load_flux_ip_adapter_state(self.pipe.transformer, state, source, self.dtype)
        self.num_tokens = image_tokens(state)

    @torch.inference_mode()
    def _image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = preprocess_clip_images(images).to(self.device, self.dtype)
        return self.image_encoder(pixels).image_embeds

    def get_image_embeds(self, images: ImageInput) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP `image_embeds` (N, D) per reference group (a group's averaged) and those of a black image, expanded to N rows."""
        groups = as_groups(images)
        embeds = self._image_embeds([image for group in groups for image in group])
        cond = torch.stack([chunk.mean(dim=0) for chunk in embeds.split([len(g) for g in groups])])
        black = Image.new("RGB", groups[0][0].size)
        return cond, self._image_embeds([black]).expand(len(groups), -1)

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
        """One `FluxPipeline` call per run of rows with the same image embedding.

        `FluxPipeline` repeats the image embedding it is given once per row (`prepare_ip_adapter_image_embeds`),
        so it conditions a whole call on one embedding: N different rows given at once would make every
        row attend to all N subjects. Rows of one subject (DreamBench's batches, `generate`'s samples) stay one call."""
        set_flux_ip_adapter_scale(self.pipe.transformer, scale)
        parts = []
        for start, stop in runs_of_equal_rows(cond):
            parts.append(
                self.pipe(
                    prompt=prompts[start:stop],
                    negative_prompt=negative_prompts[start:stop],
                    ip_adapter_image_embeds=[cond[start : start + 1, None].to(self.device, self.dtype)],
                    negative_ip_adapter_image_embeds=[uncond[start : start + 1, None].to(self.device, self.dtype)],
                    num_inference_steps=num_inference_steps,
                    generator=generator[start:stop] if isinstance(generator, list) else generator,
                    **pipeline_kwargs,
                ).images
            )
        return concatenate_images(parts)


def runs_of_equal_rows(rows: torch.Tensor) -> list[tuple[int, int]]:
    """[start, stop) of each run of consecutive equal rows."""
    starts = [0] + [i for i in range(1, rows.shape[0]) if not torch.equal(rows[i], rows[i - 1])]
    return list(zip(starts, starts[1:] + [rows.shape[0]]))


def concatenate_images(parts: list) -> Any:
    """The pipeline outputs of consecutive calls as one: PIL lists, numpy arrays (`output_type="np"`) or tensors (`"latent"`, `"pt"`)."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return [image for part in parts for image in part]
