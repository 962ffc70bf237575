"""XLabs' FLUX IP-Adapter as the trainer trains it: the projection and every double block's k/v layers, XLabs' files.

Unlike the h94 adapters, nothing of XLabs' adapter is frozen: the image projection (Linear CLIP
`image_embeds` -> tokens x T5 width, LayerNorm) sits inside the transformer (`encoder_hid_proj`)
and trains with the `to_k_ip` / `to_v_ip` layers. The image reaches the transformer as CLIP's
`image_embeds` (`added["image_embeds"]`), which `FluxFamily.denoise` hands over as diffusers'
`joint_attention_kwargs`. Checkpoints and training states are XLabs' `ip_adapter.safetensors`
layout (`ip_adapter.xlabs`), so a checkpoint loads wherever XLabs' file does and any XLabs file
(e.g. `XLabs-AI/flux-ip-adapter`) is a starting point.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from common.errors import BadInputError
from ip_adapter.xlabs import read_xlabs_file, transformer_key, write_xlabs_file, xlabs_key

from .family import Tensors, TrainableAdapter

#: The public file's name, as XLabs ships it.
CHECKPOINT_NAME = "ip_adapter.safetensors"
_MODULE_BLOCK = re.compile(r"ip_adapter\.(\d+)\.")
_TRANSFORMER_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.attn\.processor\.")


def adapter_modules(transformer: nn.Module) -> nn.ModuleDict:
    """The trained modules of a transformer carrying the adapter: its projection and its double blocks' processors."""
    processors = [block.attn.processor for block in transformer.transformer_blocks]
    return nn.ModuleDict({"image_proj": transformer.encoder_hid_proj, "ip_adapter": nn.ModuleList(processors)})


def to_xlabs(trained: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`adapter_modules(...).state_dict()` keys -> XLabs keys."""

    def name(key: str) -> str:
        key = key.replace("image_proj.", "encoder_hid_proj.", 1)
        return xlabs_key(_MODULE_BLOCK.sub(r"transformer_blocks.\1.attn.processor.", key, count=1))

    return {name(key): tensor for key, tensor in trained.items()}


def from_xlabs(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """XLabs keys -> `adapter_modules(...).state_dict()` keys (the inverse of `to_xlabs`)."""

    def name(key: str) -> str:
        key = transformer_key(key).replace("encoder_hid_proj.", "image_proj.", 1)
        return _TRANSFORMER_BLOCK.sub(r"ip_adapter.\1.", key, count=1)

    return {name(key): tensor for key, tensor in state.items()}


class XLabsAdapter(TrainableAdapter):
    """The adapter inside a FLUX transformer; `modules` (projection + k/v) all train."""

    checkpoint_files = (CHECKPOINT_NAME,)

    def __init__(self, modules: nn.ModuleDict) -> None:
        self.modules = modules

    def condition(
        self, prompt_embeds: torch.Tensor, image_features: torch.Tensor, added: Tensors | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, Tensors]:
        """T5's tokens for both halves; the reference's CLIP `image_embeds` (B, D) beside the pooled prompt, for both halves."""
        added = {name: tensor.to(dtype) for name, tensor in (added or {}).items()}
        added["image_embeds"] = image_features.to(dtype).repeat(2, 1)
        return prompt_embeds.to(dtype).repeat(2, 1, 1), added

    def save_checkpoint(self, directory: Path, trained: Mapping[str, torch.Tensor]) -> None:
        """XLabs' `ip_adapter.safetensors` in bf16, FLUX's own precision."""
        write_xlabs_file(directory / CHECKPOINT_NAME, to_xlabs(trained), dtype=torch.bfloat16)

    def save_state(self, path: Path, trained: Mapping[str, torch.Tensor]) -> None:
        write_xlabs_file(path, to_xlabs(trained), dtype=None)

    def read_state(self, path: Path) -> dict[str, torch.Tensor]:
        state = from_xlabs(read_xlabs_file(path))
        check_shapes(state, self.modules, path)
        return state


def check_shapes(state: Mapping[str, torch.Tensor], modules: nn.Module, source: str | Path) -> None:
    """The same keys and shapes as `modules` (sharded or not: their global shapes), else one line naming `source`."""
    expected = {key: tuple(tensor.shape) for key, tensor in modules.state_dict().items()}
    if set(state) != set(expected):
        odd = sorted(set(state) ^ set(expected))
        raise BadInputError(f"{source}: an IP-Adapter for another transformer ({len(odd)} keys differ, e.g. {to_xlabs_name(odd[0])!r})")
    for key, tensor in state.items():
        if tuple(tensor.shape) != expected[key]:
            raise BadInputError(f"{source}: key {to_xlabs_name(key)!r} has shape {tuple(tensor.shape)}, this FLUX adapter {expected[key]}")


def to_xlabs_name(key: str) -> str:
    try:
        return next(iter(to_xlabs({key: torch.empty(0)})))
    except KeyError:
        return key
