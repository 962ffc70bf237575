"""The IP-Adapter checkpoint format: `{"image_proj": {...}, "ip_adapter": {...}}`.

`.bin` files hold that nested dict (loaded with `weights_only=True`, so a checkpoint can never
run code); `.safetensors` files hold the same tensors flattened under `image_proj.` / `ip_adapter.`
prefixes, which is also what diffusers' `load_ip_adapter` reads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from common.errors import BadInputError
from common.hub import no_such_path
from common.io import atomic_write

from .attention_processor import adapter_modules_of

SECTIONS = ("image_proj", "ip_adapter")
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt")


Checkpoint = dict[str, dict[str, torch.Tensor]]


@contextlib.contextmanager
def naming_file(source: str | os.PathLike | None) -> Iterator[None]:
    """A `BadInputError` raised inside starts with `source`, the file the tensors came from.

    Keys and shapes are checked when the sections are loaded into a model, often far from where the
    file was read; the loaded sections stay a plain dict (what `torch.save` writes and a weights-only
    load reads back), so the file travels as this separate argument.
    """
    try:
        yield
    except BadInputError as error:
        if source is None or str(source) in str(error):
            raise
        raise BadInputError(f"{source}: {error}") from None


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


NOT_THIS_MODEL = (
    "not an IP-Adapter-Plus checkpoint of this SDXL model (pass ip-adapter-plus_sdxl_vit-h.bin or a model.bin its training wrote)"
)


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], section: str, source: str | os.PathLike | None) -> None:
    """`load_state_dict(strict=True)` with a one-line error naming `source` (the checkpoint file) and the first offending key."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    with naming_file(source):
        if missing:
            raise BadInputError(f"checkpoint section {section!r} is missing key {missing[0]!r} ({len(missing)} missing): {NOT_THIS_MODEL}")
        if unexpected:
            raise BadInputError(
                f"checkpoint section {section!r} has unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected): {NOT_THIS_MODEL}"
            )
        for key, tensor in state_dict.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise BadInputError(
                    f"checkpoint section {section!r} key {key!r} has shape {tuple(tensor.shape)}, expected "
                    f"{tuple(expected[key].shape)}: {NOT_THIS_MODEL}"
                )
    module.load_state_dict(state_dict, strict=True)


def require_checkpoint_file(path: Path, flag: str = "IP-Adapter checkpoint") -> Path:
    """`path` is a file; a folder is named as one, with the checkpoint files in it to pass instead (`checkpoint-N/model.bin`)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise no_such_path(path, flag)
    inside = sorted({file.name for pattern in WEIGHT_FILES for file in path.glob(pattern) if file.is_file()})
    if not inside:
        raise BadInputError(f"{flag} {path}: a folder, not a checkpoint file, and it holds no .bin or .safetensors file")
    others = f" (or {', '.join(inside[1:])})" if len(inside) > 1 else ""
    raise BadInputError(f"{flag} {path}: a folder, not a checkpoint file; pass the file in it: {path / inside[0]}{others}")


def load_ip_adapter_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a `.bin` or `.safetensors` IP-Adapter checkpoint into its two sections."""
    path = require_checkpoint_file(Path(path))
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
    image_proj_model: nn.Module | Mapping[str, torch.Tensor],
    adapter_modules: nn.Module | Mapping[str, torch.Tensor],
    dtype: torch.dtype | None = torch.float16,
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
    adapter_modules: nn.Module | Mapping[str, torch.Tensor],
    dtype: torch.dtype | None = torch.float16,
) -> Path:
    """Write the adapter in the public format; the file's suffix picks `.bin` or `.safetensors`.

    `adapter_modules` is what `install_ip_adapter` returned, the UNet it was installed on, or their state dict.
    """
    path = Path(path)
    if hasattr(adapter_modules, "attn_processors"):
        adapter_modules = adapter_modules_of(adapter_modules)
    state = adapter_state(image_proj_model, adapter_modules, dtype)
    if path.suffix == ".safetensors":
        flat = {f"{section}.{key}": tensor for section, tensors in state.items() for key, tensor in tensors.items()}
        return atomic_write(path, lambda tmp: save_file(flat, str(tmp)))
    if path.suffix == ".bin":
        return atomic_write(path, lambda tmp: _torch_save(state, tmp))
    raise ValueError(f"{path}: unsupported checkpoint extension {path.suffix!r}, expected .bin or .safetensors")


def _torch_save(state: Checkpoint, path: Path) -> None:
    """`torch.save` through a file handle: given a path, torch names the zip's top folder after the file, which
    for an atomic write is a temporary name with the process id, so the same weights gave other bytes each time."""
    with open(path, "wb") as handle:
        torch.save(state, handle)


def load_adapter_state(
    image_proj_model: nn.Module, adapter_modules: nn.Module, checkpoint: Checkpoint, source: str | os.PathLike | None
) -> None:
    """Load both sections strictly: a wrong, missing or mis-shaped key is a one-line error naming `source`, the checkpoint's file."""
    load_strict(image_proj_model, checkpoint["image_proj"], "image_proj", source)
    load_strict(adapter_modules, checkpoint["ip_adapter"], "ip_adapter", source)
