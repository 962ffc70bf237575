"""XLabs' FLUX IP-Adapter on a diffusers `FluxTransformer2DModel`: install, start fresh, load, save.

The adapter is made of diffusers' own modules, the ones `FluxPipeline.load_ip_adapter` builds:
a `FluxIPAdapterAttnProcessor` (trainable `to_k_ip` / `to_v_ip`, with bias) on every double block,
the single blocks keeping their processor, and an `ImageProjection` (Linear CLIP `image_embeds` ->
tokens x T5 width, then LayerNorm) as `transformer.encoder_hid_proj`. A transformer carrying it
therefore runs diffusers' code path unchanged, in training and in `FluxPipeline`: the image enters
as `joint_attention_kwargs={"ip_adapter_image_embeds": [embeds]}` (`ip_adapter_kwargs`).

Starting fresh (no checkpoint): `to_k_ip` and `to_v_ip` weights and biases are zero, as XLabs'
own processor (`IPDoubleStreamBlockProcessor` in x-flux) initialises them, so the image branch
adds exactly zero and training starts at the base model; the projection's Linear is drawn with
`nn.Linear`'s default law (Kaiming-uniform a=sqrt(5), bias U(+-1/sqrt(fan_in))) from a CPU
generator seeded by `seed`, and its LayerNorm starts as the identity. While the values are zero
the output does not depend on the keys, so `to_v_ip` moves at the first step and `to_k_ip` from
the second.

Checkpoints are XLabs' `ip_adapter.safetensors` layout (`ip_adapter.xlabs`), read and written
tensor by tensor under the names the modules have in the transformer.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor
from torch import nn

from common.errors import BadInputError

from .xlabs import ROWS_OF_16_TOKENS, image_tokens, num_double_blocks, read_xlabs_file, transformer_key, write_xlabs_file, xlabs_key


def _check_tokens(num_tokens: int, t5_dim: int) -> None:
    """Only counts diffusers' loader reads back from the projection's rows (16 iff 16 x 4096 rows, else 4)."""
    if (num_tokens == 16) != (num_tokens * t5_dim == ROWS_OF_16_TOKENS) or num_tokens not in (4, 16):
        raise ValueError(f"{num_tokens} image tokens of width {t5_dim}: diffusers reads 4, or 16 when the projection has 65536 rows")


def install_flux_ip_adapter(
    transformer: FluxTransformer2DModel, image_embed_dim: int, num_tokens: int = 4, dtype: torch.dtype | None = None
) -> None:
    """Put diffusers' IP-Adapter modules (uninitialised) into `transformer`, on its device, in `dtype` (default its dtype)."""
    if not isinstance(transformer, FluxTransformer2DModel):
        raise TypeError(f"expected a FluxTransformer2DModel, got {type(transformer).__name__}")
    t5_dim = transformer.config.joint_attention_dim
    _check_tokens(num_tokens, t5_dim)
    device, dtype = transformer.device, dtype or transformer.dtype
    processors = {
        name: FluxIPAdapterAttnProcessor(transformer.inner_dim, t5_dim, num_tokens=(num_tokens,), scale=1.0, device=device, dtype=dtype)
        if name.startswith("transformer_blocks.")
        else processor
        for name, processor in transformer.attn_processors.items()
    }
    transformer.set_attn_processor(processors)
    with torch.device(device):
        projection = ImageProjection(image_embed_dim=image_embed_dim, cross_attention_dim=t5_dim, num_image_text_embeds=num_tokens)
    if projection.image_embeds.weight.dtype != dtype:  # only then: `.to` cannot swap the fake tensors of the memory plan
        projection.to(dtype)
    transformer.encoder_hid_proj = MultiIPAdapterImageProjection([projection])


def adapter_parameters(transformer: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's parameters by their name in the transformer (the only ones a PatchDPO run trains)."""
    found = {name: parameter for name, parameter in transformer.named_parameters() if _is_adapter(name)}
    if not found:
        raise ValueError("this transformer has no IP-Adapter: call install_flux_ip_adapter or load_flux_ip_adapter first")
    return found


def _is_adapter(name: str) -> bool:
    try:
        xlabs_key(name)
    except KeyError:
        return False
    return True


@torch.no_grad()
def fresh_flux_ip_adapter(
    transformer: FluxTransformer2DModel, image_embed_dim: int, num_tokens: int = 4, seed: int = 0, dtype: torch.dtype | None = None
) -> None:
    """Install an adapter initialised as the module docstring states: zero k/v, a seeded projection."""
    install_flux_ip_adapter(transformer, image_embed_dim, num_tokens, dtype)
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in adapter_parameters(transformer).items():
        if ".norm." in name:
            parameter.fill_(1.0 if name.endswith("weight") else 0.0)
        elif ".image_embeds." in name:
            parameter.copy_(_linear_init(parameter.shape, image_embed_dim, name.endswith("weight"), generator))
        else:
            parameter.zero_()


def _linear_init(shape: torch.Size, fan_in: int, is_weight: bool, generator: torch.Generator) -> torch.Tensor:
    """`nn.Linear.reset_parameters`' law, drawn on the CPU from `generator` (so any device gets the same numbers)."""
    tensor = torch.empty(shape)
    if is_weight:
        return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(tensor, -bound, bound, generator=generator)


@torch.no_grad()
def load_flux_ip_adapter(transformer: FluxTransformer2DModel, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Install the adapter and load an XLabs-layout file into it; a file of another model is a one-line error naming it."""
    load_flux_ip_adapter_state(transformer, read_xlabs_file(path), path, dtype)


@torch.no_grad()
def load_flux_ip_adapter_state(
    transformer: FluxTransformer2DModel, state: dict[str, torch.Tensor], path: str | os.PathLike | None, dtype: torch.dtype | None = None
) -> None:
    """`load_flux_ip_adapter` for tensors already read (and checked) from the XLabs file `path`."""
    blocks = transformer.config.num_layers
    if num_double_blocks(state) != blocks:
        raise BadInputError(f"{path}: an IP-Adapter for {num_double_blocks(state)} double blocks, this FLUX transformer has {blocks}")
    install_flux_ip_adapter(transformer, state["ip_adapter_proj_model.proj.weight"].shape[1], image_tokens(state), dtype)
    parameters = adapter_parameters(transformer)
    for key, tensor in state.items():
        parameter = parameters[transformer_key(key)]
        if parameter.shape != tensor.shape:
            raise BadInputError(
                f"{path}: key {key!r} has shape {tuple(tensor.shape)}, this FLUX transformer expects {tuple(parameter.shape)}: "
                "an IP-Adapter of another model"
            )
        parameter.copy_(tensor)


def flux_adapter_state(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under XLabs' keys (detached, where they live)."""
    return {xlabs_key(name): parameter.detach() for name, parameter in adapter_parameters(transformer).items()}


def save_flux_ip_adapter(path: str | os.PathLike, transformer: nn.Module, dtype: torch.dtype | None = None) -> Path:
    """Write the adapter as XLabs' `ip_adapter.safetensors` (dtype None keeps the parameters' dtype)."""
    return write_xlabs_file(path, flux_adapter_state(transformer), dtype)


def set_flux_ip_adapter_scale(transformer: nn.Module, scale: float) -> None:
    """Weight of the image branch in every double block (0 turns the image prompt off), as `set_ip_adapter_scale` sets it."""
    for processor in transformer.attn_processors.values():
        if isinstance(processor, FluxIPAdapterAttnProcessor):
            processor.scale = [float(scale)]


def ip_adapter_kwargs(image_embeds: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """`joint_attention_kwargs` for (B, D) CLIP `image_embeds`, one image per row; a new dict per call (the transformer pops it)."""
    if image_embeds.ndim != 2:
        raise ValueError(f"expected (B, D) CLIP image_embeds, got shape {tuple(image_embeds.shape)}")
    return {"ip_adapter_image_embeds": [image_embeds[:, None]]}
