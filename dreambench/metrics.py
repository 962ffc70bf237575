"""The three DreamBench metrics: CLIP-T, CLIP-I and DINO, computed as the paper's evaluation code does.

- CLIP-T: cosine between the CLIP image embedding of a generation and the CLIP text embedding of
  its prompt (`clip.tokenize(..., truncate=True)`), averaged over the generations.
- CLIP-I: mean of the full cosine matrix between generations and reference photos, with the
  preprocessing returned by `clip.load`.
- DINO: the same with the CLS token of DINO ViT-S/16 after its final layernorm (no pooler) and
  Resize(256, bicubic) -> CenterCrop(224) -> ImageNet mean/std.

Cosines are raw (no x100, no logit scale). CLIP is loaded with `clip.load(..., jit=False)`, which
keeps its fp16 weights on GPU and casts to fp32 on CPU, as in the reference run; DINO runs in fp32.
Embeddings are L2-normalised in fp32. Nothing here downloads: a CLIP model name must already be in
clip's cache (verified against the published checksum) and DINO must be a local directory.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from transformers import ViTModel
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from common.batching import batched
from common.errors import BadInputError
from common.io import sha256_file

with warnings.catch_warnings():
    # openai-clip imports the deprecated pkg_resources; the notice is not actionable for users.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    import clip
    import clip.clip as _clip_impl


DINO_TRANSFORM = transforms.Compose(
    [
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ]
)

CLIPPreprocess = Callable[[Image.Image], torch.Tensor]


def default_clip_cache() -> Path:
    """Where `clip.load` keeps downloaded weights when no download_root is given."""
    return Path(os.path.expanduser("~/.cache/clip"))


def resolve_clip_checkpoint(name_or_path: str | os.PathLike, download_root: str | os.PathLike | None = None) -> Path:
    """Turn `--clip_model` into a local checkpoint file without ever downloading.

    `clip.load(name)` downloads when the file is missing or its checksum differs, so a model name is
    resolved here to the file clip would have cached, and its SHA-256 (part of OpenAI's URL) is
    checked, so the scores come from the published weights.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = str(name_or_path)
    # clip keeps the published URLs (file name and checksum) only in this private table.
    url = _clip_impl._MODELS.get(name)
    if url is None:
        raise BadInputError(
            f"--clip_model {name}: not a file and not an openai-clip model name "
            f"({', '.join(clip.available_models())}); pass the local .pt path"
        )
    cached = Path(download_root or default_clip_cache()) / os.path.basename(url)
    if not cached.is_file():
        raise BadInputError(
            f"--clip_model {name}: {cached} not found and this evaluator never downloads; "
            f"pass the local .pt path (the file published at {url})"
        )
    expected_sha256 = url.split("/")[-2]
    if sha256_file(cached) != expected_sha256:
        raise BadInputError(f"{cached}: SHA-256 differs from the published {name} weights; pass a verified local .pt path")
    return cached


def load_clip(
    name_or_path: str | os.PathLike, device: str | torch.device, download_root: str | os.PathLike | None = None
) -> tuple[torch.nn.Module, CLIPPreprocess]:
    """Load an OpenAI CLIP checkpoint (TorchScript archive) as the plain module, with its preprocessing."""
    checkpoint = resolve_clip_checkpoint(name_or_path, download_root)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*is deprecated", category=FutureWarning)
            model, preprocess = clip.load(str(checkpoint), device=str(device), jit=False)
    except Exception as exc:  # clip.load fails with anything from EOFError to KeyError on a foreign file
        detail = " ".join(str(exc).split())[:300]
        raise BadInputError(f"{checkpoint}: not an OpenAI CLIP checkpoint ({type(exc).__name__}: {detail})") from None
    return model.eval(), preprocess


def load_dino(path: str | os.PathLike, device: str | torch.device) -> ViTModel:
    """Load DINO ViT from a local Hugging Face directory (facebook/dino-vits16 layout), without a pooler."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise BadInputError(
            f"--dino_model {path}: not a local Hugging Face model directory (no config.json); pass a local copy of facebook/dino-vits16"
        )
    try:
        model, info = ViTModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise BadInputError(f"{path}: cannot load a transformers ViTModel ({type(exc).__name__}: {detail})") from None
    missing = sorted(info["missing_keys"]) + sorted(key for key, *_ in info["mismatched_keys"])
    if missing:
        listed = ", ".join(missing[:5])
        raise BadInputError(f"{path}: checkpoint does not fit a ViTModel (missing or mismatched weights: {listed})")
    return model.to(device=device, dtype=torch.float32).eval()


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _normalised(features: list[torch.Tensor]) -> torch.Tensor:
    return F.normalize(torch.cat(features).float().cpu(), dim=-1)


@torch.no_grad()
def clip_image_features(model: torch.nn.Module, preprocess: CLIPPreprocess, images: Sequence[Image.Image], batch_size: int) -> torch.Tensor:
    """Unit-norm CLIP image embeddings (N, D), fp32 on CPU."""
    device = _model_device(model)
    features = [model.encode_image(torch.stack([preprocess(image) for image in batch]).to(device)) for batch in batched(images, batch_size)]
    return _normalised(features)


@torch.no_grad()
def clip_text_features(model: torch.nn.Module, prompts: Sequence[str], batch_size: int) -> torch.Tensor:
    """Unit-norm CLIP text embeddings (N, D), fp32 on CPU; prompts longer than 77 tokens are truncated."""
    device = _model_device(model)
    features = [model.encode_text(clip.tokenize(list(batch), truncate=True).to(device)) for batch in batched(prompts, batch_size)]
    return _normalised(features)


@torch.no_grad()
def dino_image_features(model: ViTModel, images: Sequence[Image.Image], batch_size: int) -> torch.Tensor:
    """Unit-norm DINO CLS features (N, D): the final-layernorm CLS token, fp32 on CPU."""
    device = _model_device(model)
    features = []
    for batch in batched(images, batch_size):
        pixel_values = torch.stack([DINO_TRANSFORM(image.convert("RGB")) for image in batch]).to(device)
        features.append(model(pixel_values=pixel_values).last_hidden_state[:, 0])
    return _normalised(features)


def mean_matched_cosine(features: torch.Tensor, others: torch.Tensor) -> float:
    """Mean cosine of row i with row i (CLIP-T: each image with its own prompt); inputs unit-norm."""
    if features.shape != others.shape:
        raise ValueError(f"expected matching feature shapes, got {tuple(features.shape)} and {tuple(others.shape)}")
    return (features.double() * others.double()).sum(dim=-1).mean().item()


def mean_pairwise_cosine(features: torch.Tensor, references: torch.Tensor) -> float:
    """Mean of the full (generations x references) cosine matrix (CLIP-I, DINO); inputs unit-norm."""
    return (features.double() @ references.double().T).mean().item()
