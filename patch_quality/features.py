"""Patch features of a ViT-family backbone, as an L2-normalised (H', W', D) grid per image.

Quality maps compare patches by cosine similarity, so features are L2-normalised here once and
every later step is a matrix product. Images are centre-cropped to a square and resized to
`image_size` without any further crop, so the patch grid covers exactly the square that training
crops (Resize + CenterCrop) and map cells line up with latent cells.

A self-supervised finetune (`patch_quality.ssl_train`) is stored as a small safetensors file
holding only the trained parameters; it is applied on top of the same backbone directory
(`finetuned=`), and refuses a backbone whose config differs from the one it was trained from.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from common.errors import BadInputError
from common.hub import resolve_folder
from common.io import atomic_path, sha256_file

# Vision classes we know how to read patch tokens from, by architecture name and by model_type.
_ARCHITECTURES = ("Dinov2Model", "Dinov2WithRegistersModel", "ViTModel", "CLIPVisionModel", "CLIPVisionModelWithProjection")
_MODEL_TYPES = {
    "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel",
    "vit": "ViTModel",
    "clip_vision_model": "CLIPVisionModel",
    "clip": "CLIPVisionModel",
}
FINETUNE_FORMAT = "patchdpo-ssl-backbone/1"


def load_backbone(backbone_dir: str | os.PathLike) -> torch.nn.Module:
    """Load a ViT-family vision model from a `save_pretrained` directory or a Hugging Face id (`common.hub`)."""
    backbone_dir = resolve_folder(backbone_dir, "--backbone")
    if not (backbone_dir / "config.json").is_file():
        raise BadInputError(f"backbone directory {backbone_dir} has no config.json (expected a save_pretrained folder)")
    config = AutoConfig.from_pretrained(backbone_dir, local_files_only=True)
    architectures = [name for name in (config.architectures or []) if name in _ARCHITECTURES]
    class_name = architectures[0] if architectures else _MODEL_TYPES.get(config.model_type)
    if class_name is None:
        raise BadInputError(f"backbone {backbone_dir} has model_type {config.model_type!r}; supported: {sorted(_MODEL_TYPES)}")
    model_class = getattr(transformers, class_name)
    kwargs = {"add_pooling_layer": False} if class_name == "ViTModel" else {}
    return model_class.from_pretrained(backbone_dir, local_files_only=True, **kwargs).eval()


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The encoder's list of transformer blocks, whatever the family calls it."""
    num_layers = _vision_config(model).num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return module
    raise BadInputError(f"cannot find the {num_layers} transformer blocks of {type(model).__name__}")


def _vision_config(model: torch.nn.Module):
    config = model.config
    return getattr(config, "vision_config", config)


def _edge(size: Mapping | object) -> int | None:
    """Square input edge of an image-processor size entry (a dict or a transformers SizeDict)."""
    get = size.get if isinstance(size, Mapping) else lambda key: getattr(size, key, None)
    return get("height") or get("shortest_edge")


def _processor_settings(backbone_dir: Path) -> tuple[tuple[float, ...], tuple[float, ...], int | None]:
    """(mean, std, input edge) from the directory's image-processor config, ImageNet defaults without one."""
    if not (backbone_dir / "preprocessor_config.json").is_file():
        return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, None
    processor = AutoImageProcessor.from_pretrained(backbone_dir, local_files_only=True)
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    edges = [_edge(size) for size in (crop, getattr(processor, "size", None)) if size is not None]
    edge = next((int(e) for e in edges if e), None)
    return tuple(processor.image_mean), tuple(processor.image_std), edge


def center_square(image: Image.Image) -> Image.Image:
    """The largest centred square: the region training keeps after Resize + CenterCrop."""
    width, height = image.size
    edge = min(width, height)
    left, top = (width - edge) // 2, (height - edge) // 2
    return image.crop((left, top, left + edge, top + edge))


def config_sha256(backbone_dir: str | os.PathLike) -> str:
    return sha256_file(resolve_folder(backbone_dir, "--backbone") / "config.json")


class PatchFeatureExtractor:
    """Backbone + layer + preprocessing: images in, L2-normalised (N, H', W', D) patch grids out.

    `layer` indexes the model's `hidden_states` (0 = patch embeddings, i = output of block i,
    negative counts from the end; -1 is the last block before the final layer norm). Class and
    register tokens are dropped: the patch tokens are the last H'*W' tokens in every supported
    family.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layer: int = -1,
        image_size: int | None = None,
        image_mean: Iterable[float] = IMAGENET_DEFAULT_MEAN,
        image_std: Iterable[float] = IMAGENET_DEFAULT_STD,
    ):
        vision_config = _vision_config(model)
        self.model = model
        self.num_layers = int(vision_config.num_hidden_layers)
        if not -(self.num_layers + 1) <= layer <= self.num_layers:
            raise BadInputError(
                f"layer {layer} is out of range for a backbone with {self.num_layers} blocks (hidden_states 0..{self.num_layers})"
            )
        self.layer = layer % (self.num_layers + 1)
        self.patch_size = int(vision_config.patch_size)
        self.image_size = int(image_size or vision_config.image_size)
        if self.image_size % self.patch_size:
            raise BadInputError(f"image size {self.image_size} is not a multiple of the backbone patch size {self.patch_size}")
        self.grid_size = self.image_size // self.patch_size
        self.image_mean = torch.tensor(tuple(image_mean), dtype=torch.float32).view(1, 3, 1, 1)
        self.image_std = torch.tensor(tuple(image_std), dtype=torch.float32).view(1, 3, 1, 1)
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters

    @classmethod
    def from_pretrained(
        cls,
        backbone_dir: str | os.PathLike,
        layer: int = -1,
        image_size: int | None = None,
        finetuned: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> PatchFeatureExtractor:
        backbone_dir = resolve_folder(backbone_dir, "--backbone")
        model = load_backbone(backbone_dir)
        finetune_metadata = load_finetuned(model, finetuned, backbone_dir) if finetuned is not None else {}
        mean, std, processor_edge = _processor_settings(backbone_dir)
        model.to(device=device, dtype=dtype).requires_grad_(False)
        extractor = cls(model, layer=layer, image_size=image_size or processor_edge, image_mean=mean, image_std=std)
        trained_layer = finetune_metadata.get("layer")
        if trained_layer is not None and int(trained_layer) != extractor.layer:
            raise BadInputError(f"{finetuned} was trained for the features of layer {trained_layer}, not layer {extractor.layer}")
        return extractor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to_pixels(self, images: Iterable[Image.Image]) -> torch.Tensor:
        """Square-crop, resize (bicubic) and stack images as (N, 3, S, S) floats in [0, 1]."""
        arrays = [
            np.asarray(center_square(image.convert("RGB")).resize((self.image_size, self.image_size), Image.BICUBIC), dtype=np.float32)
            for image in images
        ]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> the backbone's normalised input (differentiable, any device)."""
        mean = self.image_mean.to(pixels.device, pixels.dtype)
        std = self.image_std.to(pixels.device, pixels.dtype)
        return (pixels - mean) / std

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels (N, 3, S, S) -> L2-normalised features (N, S/p, S/p, D); keeps gradients."""
        height, width = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        inputs = self.normalize(pixels.to(self.device, self.dtype))
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        outputs = self.model(pixel_values=inputs, output_hidden_states=True, **kwargs)
        tokens = outputs.hidden_states[self.layer]
        patches = tokens[:, tokens.shape[1] - height * width :]
        grid = patches.reshape(patches.shape[0], height, width, patches.shape[-1])
        return F.normalize(grid.float(), dim=-1)

    @torch.no_grad()
    def __call__(self, images: Iterable[Image.Image]) -> torch.Tensor:
        return self.patch_features(self.to_pixels(images))


def save_finetuned(
    path: str | os.PathLike,
    model: torch.nn.Module,
    parameter_names: Iterable[str],
    backbone_dir: str | os.PathLike,
    metadata: Mapping[str, str],
) -> None:
    """Store only the finetuned parameters (atomically), tagged with the backbone they apply to."""
    state = model.state_dict()
    tensors = {name: state[name].detach().to("cpu").contiguous() for name in parameter_names}
    meta = {
        **{str(key): str(value) for key, value in metadata.items()},
        "format": FINETUNE_FORMAT,
        "backbone_config_sha256": config_sha256(backbone_dir),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def finetuned_metadata(path: str | os.PathLike) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"finetuned backbone checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise BadInputError(f"{path} is not a readable safetensors file ({' '.join(str(error).split())})") from None
    if metadata.get("format") != FINETUNE_FORMAT:
        raise BadInputError(f"{path} is not a patch_quality.ssl_train checkpoint (metadata format {metadata.get('format')!r})")
    return metadata


def load_finetuned(model: torch.nn.Module, path: str | os.PathLike, backbone_dir: str | os.PathLike) -> dict[str, str]:
    """Overwrite the finetuned parameters of `model` (loaded from `backbone_dir`) from `path`."""
    metadata = finetuned_metadata(path)
    if metadata["backbone_config_sha256"] != config_sha256(backbone_dir):
        raise BadInputError(f"{path} was trained from a different backbone than {backbone_dir} (config.json differs)")
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    own = model.state_dict()
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise BadInputError(f"{path} holds parameters the backbone does not have, e.g. {unknown[0]!r}")
    for name, tensor in tensors.items():
        if tensor.shape != own[name].shape:
            raise BadInputError(f"{path}: parameter {name!r} has shape {tuple(tensor.shape)}, backbone expects {tuple(own[name].shape)}")
    model.load_state_dict(tensors, strict=False)
    return metadata


def describe(extractor: PatchFeatureExtractor, backbone_dir: str | os.PathLike, finetuned: str | os.PathLike | None) -> dict[str, str]:
    """Metadata that identifies the features, for files derived from them."""
    return {
        "backbone": str(backbone_dir),
        "backbone_class": type(extractor.model).__name__,
        "backbone_config_sha256": config_sha256(backbone_dir),
        "finetuned": str(finetuned) if finetuned else "",
        "finetuned_sha256": sha256_file(finetuned) if finetuned else "",
        "layer": str(extractor.layer),
        "feature_image_size": str(extractor.image_size),
        "feature_grid": json.dumps([extractor.grid_size, extractor.grid_size]),
    }
