"""The IP-Adapter checkpoint format: `{"image_proj": {...}, "ip_adapter": {...}}`.

`.bin` files hold that nested dict (loaded with `weights_only=True`, so a checkpoint can never
run code); `.safetensors` files hold the same tensors flattened under `image_proj.` / `ip_adapter.`
prefixes, which is also what diffusers' `load_ip_adapter` reads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from common.errors import BadInputError
from common.io import atomic_write

from .attention_processor import adapter_modules_of

SECTIONS = ("image_proj", "ip_adapter")
Checkpoint = dict[str, dict[str, torch.Tensor]]


def _check_sections(checkpoint: object, path: Path) -> Checkpoint:
    if not isinstance(checkpoint, Mapping):
        raise BadInputError(f"{path}: expected a dict with keys {list(SECTIONS)}, got {type(checkpoint).__name__}")
    for section in SECTIONS:
        if section not in checkpoint:
            raise BadInputError(f"{path}: checkpoint has no {section!r} section (found {sorted(checkpoint)})")
        if not checkpoint[section] or not all(isinstance(v, torch.Tensor) for v in checkpoint[section].values()):
            raise BadInputError(f"{path}: checkpoint section {section!r} must be a non-empty dict of tensors")
        _check_values(checkpoint[section], path, section)
    return {section: dict(checkpoint[section]) for section in SECTIONS}


def _check_values(tensors: Mapping[str, torch.Tensor], path: Path, section: str) -> None:
    """Every tensor finite and the section not wiped to zeros: either would generate black images without an error."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise BadInputError(f"{path}: checkpoint section {section!r} key {key!r} holds {bad} NaN/inf value(s)")
    if all(not tensor.any() for tensor in tensors.values()):
        raise BadInputError(f"{path}: checkpoint section {section!r} is all zeros (a wiped or never-trained checkpoint)")


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], section: str) -> None:
    """`load_state_dict(strict=True)` with a one-line error naming the first offending key."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing:
        raise BadInputError(f"checkpoint section {section!r} is missing key {missing[0]!r} ({len(missing)} missing)")
    if unexpected:
        raise BadInputError(f"checkpoint section {section!r} has unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise BadInputError(
                f"checkpoint section {section!r} key {key!r} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
            )
    module.load_state_dict(state_dict, strict=True)


def load_ip_adapter_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a `.bin` or `.safetensors` IP-Adapter checkpoint into its two sections."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"IP-Adapter checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            flat = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise BadInputError(f"{path}: not a readable safetensors file ({error})") from None
        nested: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in flat.items():
            section, _, name = key.partition(".")
            nested.setdefault(section, {})[name] = tensor
        unknown = sorted(set(nested) - set(SECTIONS))
        if unknown:
            raise BadInputError(f"{path}: unexpected key prefix {unknown[0]!r}, expected 'image_proj.' or 'ip_adapter.'")
        return _check_sections(nested, path)
    if path.suffix in {".bin", ".pt", ".pth", ".ckpt"}:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types for corrupt or unsafe archives
            raise BadInputError(f"{path}: not a loadable weights-only torch checkpoint ({type(error).__name__})") from None
        return _check_sections(checkpoint, path)
    raise BadInputError(f"{path}: unsupported checkpoint extension {path.suffix!r}, expected .bin or .safetensors")


def adapter_state(
    image_proj_model: nn.Module | Mapping[str, torch.Tensor], adapter_modules: nn.Module, dtype: torch.dtype | None = torch.float16
) -> Checkpoint:
    """Detached CPU copies of the two sections, cast to `dtype` (fp16 as the released files).

    `image_proj_model` may also be a state dict: a trainer keeps the frozen Resampler's loaded tensors
    so that running it in half precision never changes what is saved.
    """

    def export(source: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors = source.state_dict() if isinstance(source, nn.Module) else source
        return {
            key: tensor.detach().to("cpu", dtype=dtype if dtype is not None else tensor.dtype).contiguous()
            for key, tensor in tensors.items()
        }

    return {"image_proj": export(image_proj_model), "ip_adapter": export(adapter_modules)}


def save_ip_adapter(
    path: str | os.PathLike,
    image_proj_model: nn.Module | Mapping[str, torch.Tensor],
    adapter_modules: nn.Module,
    dtype: torch.dtype | None = torch.float16,
) -> Path:
    """Write the adapter in the public format; the file's suffix picks `.bin` or `.safetensors`.

    `adapter_modules` is what `install_ip_adapter` returned, or the UNet it was installed on.
    """
    path = Path(path)
    if hasattr(adapter_modules, "attn_processors"):
        adapter_modules = adapter_modules_of(adapter_modules)
    state = adapter_state(image_proj_model, adapter_modules, dtype)
    if path.suffix == ".safetensors":
        flat = {f"{section}.{key}": tensor for section, tensors in state.items() for key, tensor in tensors.items()}
        return atomic_write(path, lambda tmp: save_file(flat, str(tmp)))
    if path.suffix == ".bin":
        return atomic_write(path, lambda tmp: torch.save(state, tmp))
    raise ValueError(f"{path}: unsupported checkpoint extension {path.suffix!r}, expected .bin or .safetensors")


def load_adapter_state(image_proj_model: nn.Module, adapter_modules: nn.Module, checkpoint: Checkpoint) -> None:
    """Load both sections strictly: a wrong, missing or mis-shaped key is a one-line error."""
    load_strict(image_proj_model, checkpoint["image_proj"], "image_proj")
    load_strict(adapter_modules, checkpoint["ip_adapter"], "ip_adapter")
