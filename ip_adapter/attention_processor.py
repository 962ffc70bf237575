"""Decoupled cross-attention of IP-Adapter, installed into any UNet2DConditionModel (SDXL, SD 1.5).

Image tokens ride along with the text tokens: the UNet's `encoder_hidden_states` is
`cat([text_tokens, image_tokens], dim=1)` and the processor splits off the last `num_tokens`.
That keeps the diffusers pipeline untouched (it just sees longer prompt embeddings) and lets every
row of a batch carry its own image tokens, so one batch can mix subjects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn


class IPAttnProcessor(nn.Module):
    """Text cross-attention plus `scale` x attention over the image tokens (separate K/V).

    It is an `nn.Module` so the `to_k_ip`/`to_v_ip` projections are parameters of the UNet (moved,
    cast and saved with it), as in the IP-Adapter reference implementation.

    `scale` is a runtime input, not a setting: every generation call sets it (`set_ip_adapter_scale`)
    and training leaves it at 1. It is held as a 0-dim float32 CPU tensor, outside the state dict
    and untouched by `.to()`: a compiled UNet then reads it as a graph input (a new value needs no
    recompile).
    """

    def __init__(
        self,
        hidden_size: int,
        cross_attention_dim: int,
        num_tokens: int = 16,
        scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.scale = _scale_tensor(scale)
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False, device=device, dtype=dtype)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False, device=device, dtype=dtype)

    def _attend(self, attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask=None) -> torch.Tensor:
        batch = query.shape[0]
        head_dim = key.shape[-1] // attn.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key = split(query), split(key)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, split(value), attn_mask=mask, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] <= self.num_tokens:
            raise ValueError(
                f"IP-Adapter cross-attention expects text tokens followed by {self.num_tokens} image tokens, "
                f"got encoder_hidden_states of shape {None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)}"
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        text_states = encoder_hidden_states[:, : -self.num_tokens]
        image_states = encoder_hidden_states[:, -self.num_tokens :]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, text_states.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.norm_cross:
            text_states = attn.norm_encoder_hidden_states(text_states)

        query = attn.to_q(hidden_states)
        hidden_states = self._attend(attn, query, attn.to_k(text_states), attn.to_v(text_states), attention_mask)
        image_attention = self._attend(attn, query, self.to_k_ip(image_states), self.to_v_ip(image_states))
        # Scaled in float32, as a Python-float scale would be, then rounded once to the compute dtype.
        hidden_states = hidden_states + (self.scale * image_attention.float()).to(hidden_states.dtype)

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _scale_tensor(scale: float) -> torch.Tensor:
    return torch.tensor(float(scale), dtype=torch.float32)


def _is_cross_attention(name: str) -> bool:
    return not name.endswith("attn1.processor")


def install_ip_adapter(unet: nn.Module, num_tokens: int = 16) -> nn.ModuleDict:
    """Put an `IPAttnProcessor` on every cross-attention layer; self-attention keeps its processor.

    `to_k_ip`/`to_v_ip` start as copies of the layer's text `to_k`/`to_v`, the IP-Adapter recipe for
    training from scratch (a checkpoint loaded afterwards overwrites them). The returned
    ModuleDict is keyed by each processor's position in `unet.attn_processors`, so its
    `state_dict()` is exactly the public checkpoints' "ip_adapter" section
    (`"1.to_k_ip.weight"`, `"1.to_v_ip.weight"`, `"3.to_k_ip.weight"`, ...).
    """
    if not hasattr(unet, "attn_processors"):
        raise TypeError(f"expected a UNet2DConditionModel (SDXL or SD 1.5), got {type(unet).__name__}")
    attention_layers = dict(unet.named_modules())
    processors: dict[str, object] = {}
    for name, processor in unet.attn_processors.items():
        if not _is_cross_attention(name):
            processors[name] = processor
            continue
        attn: Attention = attention_layers[name[: -len(".processor")]]
        ip_processor = IPAttnProcessor(
            hidden_size=attn.to_k.out_features,
            cross_attention_dim=attn.to_k.in_features,
            num_tokens=num_tokens,
            device=attn.to_k.weight.device,
            dtype=attn.to_k.weight.dtype,
        )
        with torch.no_grad():
            ip_processor.to_k_ip.weight.copy_(attn.to_k.weight)
            ip_processor.to_v_ip.weight.copy_(attn.to_v.weight)
        processors[name] = ip_processor
    unet.set_attn_processor(processors)
    return adapter_modules_of(unet)


def adapter_modules_of(unet: nn.Module) -> nn.ModuleDict:
    """The installed `IPAttnProcessor`s keyed by position in `unet.attn_processors` (checkpoint keys)."""
    modules = nn.ModuleDict(
        {str(index): processor for index, processor in enumerate(unet.attn_processors.values()) if isinstance(processor, IPAttnProcessor)}
    )
    if not modules:
        raise ValueError("this UNet has no IP-Adapter processors: call install_ip_adapter(unet) first")
    return modules


def set_ip_adapter_scale(model: nn.Module, scale: float) -> None:
    """Weight of the image branch in every IP-Adapter layer of `model` (0 turns the image prompt off).

    Called by every generation call with its own scale, so no call inherits another's.
    """
    value = _scale_tensor(scale)
    for module in model.modules():
        if isinstance(module, IPAttnProcessor):
            module.scale = value
