"""The XLabs FLUX IP-Adapter file (`XLabs-AI/flux-ip-adapter`, `ip_adapter.safetensors`): read and write.

One flat safetensors file, no metadata:

    ip_adapter_proj_model.proj.{weight,bias}     Linear: CLIP image_embeds -> tokens x T5 width
    ip_adapter_proj_model.norm.{weight,bias}     LayerNorm over the T5 width
    double_blocks.<i>.processor.ip_adapter_double_stream_{k,v}_proj.{weight,bias}   one pair per double block

Our FLUX checkpoints are written with exactly these keys, so diffusers' `FluxPipeline.load_ip_adapter`
and ComfyUI's XLabs nodes take them as they take XLabs' own file. Inside the project the tensors
carry the names they have in a `FluxTransformer2DModel` with diffusers' IP-Adapter installed
(`encoder_hid_proj.image_projection_layers.0.*`, `transformer_blocks.<i>.attn.processor.to_{k,v}_ip.0.*`):
`transformer_key` / `xlabs_key` translate one into the other, key by key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.errors import BadInputError
from common.io import atomic_write

from .checkpoint import require_checkpoint_file

_PROJ = re.compile(r"ip_adapter_proj_model\.(proj|norm)\.(weight|bias)")
_BLOCK = re.compile(r"double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_([kv])_proj\.(weight|bias)")
_OUR_PROJ = re.compile(r"encoder_hid_proj\.image_projection_layers\.0\.(image_embeds|norm)\.(weight|bias)")
_OUR_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.attn\.processor\.to_([kv])_ip\.0\.(weight|bias)")
#: diffusers reads 16 image tokens when the projection has this many rows (16 x 4096), else 4.
ROWS_OF_16_TOKENS = 65536


def transformer_key(key: str) -> str:
    """The name an XLabs tensor has in a FluxTransformer2DModel carrying diffusers' IP-Adapter."""
    if match := _PROJ.fullmatch(key):
        layer = "image_embeds" if match[1] == "proj" else "norm"
        return f"encoder_hid_proj.image_projection_layers.0.{layer}.{match[2]}"
    if match := _BLOCK.fullmatch(key):
        return f"transformer_blocks.{match[1]}.attn.processor.to_{match[2]}_ip.0.{match[3]}"
    raise KeyError(key)


def xlabs_key(name: str) -> str:
    """The XLabs key of a transformer state-dict name (the inverse of `transformer_key`)."""
    if match := _OUR_PROJ.fullmatch(name):
        layer = "proj" if match[1] == "image_embeds" else "norm"
        return f"ip_adapter_proj_model.{layer}.{match[2]}"
    if match := _OUR_BLOCK.fullmatch(name):
        return f"double_blocks.{match[1]}.processor.ip_adapter_double_stream_{match[2]}_proj.{match[3]}"
    raise KeyError(name)


def expected_keys(num_double_blocks: int) -> set[str]:
    keys = {f"ip_adapter_proj_model.{layer}.{kind}" for layer in ("proj", "norm") for kind in ("weight", "bias")}
    for block in range(num_double_blocks):
        keys |= {f"double_blocks.{block}.processor.ip_adapter_double_stream_{kv}_proj.{kind}" for kv in "kv" for kind in ("weight", "bias")}
    return keys


def num_double_blocks(state: Mapping[str, torch.Tensor]) -> int:
    return len({match[1] for key in state if (match := _BLOCK.fullmatch(key))})


def image_tokens(state: Mapping[str, torch.Tensor]) -> int:
    """Image tokens per image, as diffusers' loader reads them from the projection's rows."""
    return 16 if state["ip_adapter_proj_model.proj.weight"].shape[0] == ROWS_OF_16_TOKENS else 4


def check_xlabs_state(state: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """The keys of an XLabs file (block indices 0..n-1, nothing else) and finite, not wiped, tensors."""
    unknown = sorted(key for key in state if not (_PROJ.fullmatch(key) or _BLOCK.fullmatch(key)))
    if unknown:
        raise BadInputError(f"{source}: unexpected key {unknown[0]!r}: not an XLabs FLUX IP-Adapter file (ip_adapter.safetensors)")
    missing = sorted(expected_keys(num_double_blocks(state)) - set(state))
    if missing:
        raise BadInputError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing): not a complete XLabs FLUX IP-Adapter file")
    for key, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise BadInputError(f"{source}: key {key!r} holds {int((~torch.isfinite(tensor)).sum())} NaN/inf value(s)")
    if not any(tensor.any() for tensor in state.values()):
        raise BadInputError(f"{source}: every tensor is zero (a wiped checkpoint)")


def read_xlabs_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an XLabs-layout `.safetensors` file, under their XLabs keys, checked."""
    path = require_checkpoint_file(Path(path), "FLUX IP-Adapter checkpoint")
    if path.suffix != ".safetensors":
        raise BadInputError(
            f"{path}: a FLUX IP-Adapter is a .safetensors file in XLabs' layout (ip_adapter.safetensors), got {path.suffix!r}"
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise BadInputError(f"{path}: not a readable safetensors file ({error})") from None
    check_xlabs_state(state, path)
    return state


def write_xlabs_file(path: str | os.PathLike, state: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> Path:
    """Write `state` (XLabs keys) atomically, cast to `dtype` (None keeps each tensor's); refuses any other key."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the XLabs layout is a .safetensors file")
    unknown = sorted(key for key in state if not (_PROJ.fullmatch(key) or _BLOCK.fullmatch(key)))
    if unknown or set(state) != expected_keys(num_double_blocks(state)):
        raise ValueError(f"not an XLabs FLUX IP-Adapter state: unexpected {unknown[:1]} or missing keys")
    flat = {key: tensor.detach().to("cpu", dtype=dtype or tensor.dtype).contiguous() for key, tensor in state.items()}
    return atomic_write(path, lambda tmp: save_file(flat, str(tmp)))
