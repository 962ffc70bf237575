"""The three DreamBench metrics: CLIP-T, CLIP-I and DINO, computed as the paper's evaluation code does.

- CLIP-T: cosine between the CLIP image embedding of a generation and the CLIP text embedding of
  its prompt (`clip.tokenize(..., truncate=True)`), averaged over the generations.
- CLIP-I: mean of the full cosine matrix between generations and reference photos, with the
  preprocessing returned by `clip.load`.
- DINO: the same with the CLS token of DINO ViT-S/16 after its final layernorm (no pooler) and
  Resize(256, bicubic) -> CenterCrop(224) -> ImageNet mean/std.

Cosines are raw (no x100, no logit scale). CLIP is loaded with `clip.load(..., jit=False)`, which
keeps its fp16 weights on GPU and casts to fp32 on CPU, as in the reference run; DINO runs in fp32.
Embeddings are L2-normalised in fp32. A CLIP model name is fetched as `clip.load` does (its cache,
download, checksum); DINO is a folder or a Hugging Face id (`common.hub`), with torch.hub's LayerNorm
eps of 1e-6 (the Hugging Face config of facebook/dino-vits16 says 1e-12).
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
from common.hub import resolve_folder
from common.io import sha256_file

with warnings.catch_warnings():
    # openai-clip imports the deprecated pkg_resources; the notice is not actionable for users.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    import clip
    import clip.clip as _clip_impl

# torch.hub's dino_vits16 (what the reference evaluation loads) builds its LayerNorms with eps=1e-6.
DINO_LAYER_NORM_EPS = 1e-6

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
    """Turn `--clip_model` into a local checkpoint file, as `clip.load(name)` does.

    A path is used as is. A model name (`ViT-B/32`) is the file clip caches under `download_root`
    (default `~/.cache/clip`), downloaded when missing or when its SHA-256 (part of OpenAI's URL)
    differs, and verified after the download, so the scores come from the published weights.
    Offline (`HF_HUB_OFFLINE=1`) only a cached, verified file is accepted.
    """
    from huggingface_hub import constants

    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = str(name_or_path)
    # clip keeps the published URLs (file name and checksum) only in this private table.
    url = _clip_impl._MODELS.get(name)
    if url is None:
        raise BadInputError(
            f"--clip_model {name}: not a file and not an openai-clip model name ({', '.join(_clip_impl._MODELS)}); pass a local .pt path"
        )
    root = Path(download_root or default_clip_cache())
    cached = root / os.path.basename(url)
    expected_sha256 = url.split("/")[-2]
    if cached.is_file() and sha256_file(cached) == expected_sha256:
        return cached
    problem = "SHA-256 differs from the published weights" if cached.is_file() else "not in the cache"
    if constants.HF_HUB_OFFLINE:
        raise BadInputError(f"--clip_model {name}: {cached} {problem} and HF_HUB_OFFLINE=1 forbids the download from {url}")
    try:
        return Path(_clip_impl._download(url, str(root)))
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; clip raises RuntimeError on a checksum mismatch
        detail = " ".join(str(exc).split())[:200]
        raise BadInputError(f"--clip_model {name}: {cached} {problem}; downloading {url} failed ({type(exc).__name__}: {detail})") from None


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
    """Load DINO ViT (a folder or an id such as facebook/dino-vits16, `common.hub`) without a pooler.

    The LayerNorm eps is set to torch.hub's 1e-6 (`DINO_LAYER_NORM_EPS`): the reference evaluation
    uses the torch.hub `dino_vits16`, while the Hugging Face config says 1e-12.
    """
    path = resolve_folder(path, "--dino_model")
    if not (path / "config.json").is_file():
        raise BadInputError(
            f"--dino_model {path}: not a local Hugging Face model directory (no config.json); pass a local copy of facebook/dino-vits16"
        )
    try:
        model, info = ViTModel.from_pretrained(
            path, add_pooling_layer=False, local_files_only=True, output_loading_info=True, layer_norm_eps=DINO_LAYER_NORM_EPS
        )
    except (OSError, ValueError, KeyError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise BadInputError(f"{path}: cannot load a transformers ViTModel ({type(exc).__name__}: {detail})") from None
    missing = sorted(info["missing_keys"]) + sorted(key for key, *_ in info["mismatched_keys"])
    if missing:
        listed = ", ".join(missing[:5])
        raise BadInputError(f"{path}: checkpoint does not fit a ViTModel (missing or mismatched weights: {listed})")
    return model.to(device=device, dtype=torch.float32).eval()


def check_metric_models(clip_model: str | os.PathLike | None, dino_model: str | os.PathLike | None) -> None:
    """Load each metric model given once on the CPU and drop it: a missing, foreign or incomplete one fails now, not after the images.

    For scripts that score only at their end. It costs the load (ViT-B/32: a ~350 MB read, seconds)
    and fetches a named CLIP model into its cache; scoring loads the models again on its device,
    where `clip.load` keeps CLIP's fp16 weights (on the CPU it casts them to fp32).
    """
    if clip_model is not None:
        load_clip(clip_model, "cpu")
    if dino_model is not None:
        load_dino(dino_model, "cpu")


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
