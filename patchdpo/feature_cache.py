"""Precomputed outputs of the frozen encoders (`--cache_dir`), computed once instead of every step.

The VAE, the CLIP image encoder and the text encoders are frozen, so their outputs for a sample
never change: per sample folder we store the reference latents (posterior mean x scaling
factor, float32), the latents of each generated image, the CLIP penultimate features of the
reference and the family's prompt tensors (both in the encoders' dtype, as the uncached loop would
produce them), plus the original image sizes. `null.safetensors` holds the features of the
all-zero CLIP input and of the empty prompt, so the per-step CFG dropout still happens with a
cache.

The CLIP input at training is a random 224 crop of the reference resized to 224 on its short
side; only for square references is that crop deterministic. A non-square reference's file
therefore holds no CLIP features, and when any reference is non-square (`clip_per_step`) every
item carries its CLIP pixels, cropped with the same draw as without a cache, and the training loop
encodes them each step with the kept image encoder: training is the same as uncached, and the
VAE and text encoders are still computed once.

Layout: `cache_dir/<key>/` where `<key>` hashes everything the features depend on (format,
resolution, model folders' files, dtype); each `sampleN.safetensors` records the sha256 of the
images it came from and is rebuilt when they change. Building is sharded by sample across
processes and resumable: finished files are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from common.errors import BadInputError
from common.io import atomic_write, sha256_file

from .pair_dataset import CLIP_SIZE, TrainingPair, clip_input, clip_training_pixels, load_training_image

if TYPE_CHECKING:
    from .models import FrozenEncoders

CACHE_FORMAT = "patchdpo-feature-cache/1"
NULL_NAME = "null.safetensors"


def _describe_dir(path: str | os.PathLike) -> list[str]:
    """Identity of a model folder: its resolved path and every file's name, size and mtime."""
    root = Path(path).resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return [str(root)] + [f"{p.relative_to(root)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]


def cache_key(resolution: int, model_dir: str | os.PathLike, image_encoder_dir: str | os.PathLike, feature_dtype: torch.dtype) -> str:
    description = {
        "format": CACHE_FORMAT,
        "resolution": resolution,
        "model": _describe_dir(model_dir),
        "image_encoder": _describe_dir(image_encoder_dir),
        "feature_dtype": str(feature_dtype),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def _sources(pairs: Iterable[TrainingPair]) -> dict[str, str]:
    pairs = list(pairs)
    sources = {"reference": sha256_file(pairs[0].reference_path)}
    sources.update({f"generated.{pair.generated_index}": sha256_file(pair.generated_path) for pair in pairs})
    return sources


class FeatureCache:
    """One cache folder (`cache_dir/<key>`): per-sample files plus the null entry."""

    def __init__(self, root: str | os.PathLike, prompt_fields: tuple[str, ...]) -> None:
        self.root = Path(root)
        self.prompt_fields = prompt_fields  # the family's prompt tensors (base_models)
        self._null: dict[str, torch.Tensor] | None = None

    @classmethod
    def for_key(cls, cache_dir: str | os.PathLike, key: str, prompt_fields: tuple[str, ...]) -> FeatureCache:
        return cls(Path(cache_dir) / key, prompt_fields)

    def sample_path(self, sample: str) -> Path:
        return self.root / f"{sample}.safetensors"

    def is_fresh(self, sample: str, sources: dict[str, str]) -> bool:
        path = self.sample_path(sample)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except SafetensorError:  # a damaged or foreign file (safetensors never runs what it reads): rebuilt like a stale one
            return False
        return json.loads(metadata.get("sources", "{}")) == sources

    def write_sample(self, sample: str, tensors: dict[str, torch.Tensor], sources: dict[str, str]) -> None:
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        metadata = {"format": CACHE_FORMAT, "sources": json.dumps(sources, sort_keys=True)}
        atomic_write(self.sample_path(sample), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    def read_pair(self, sample: str, k: int, image_features: bool = True) -> dict[str, torch.Tensor]:
        path = self.sample_path(sample)
        if not path.is_file():
            raise BadInputError(f"feature cache {self.root} has no entry for sample {sample!r}; rebuild it")
        tensors = _read(path)
        if f"generated_latents.{k}" not in tensors:
            raise BadInputError(f"feature cache file {path} has no generated image k={k}; rebuild the cache")
        names = ["reference_latents", "reference_size", *self.prompt_fields]
        entry = {name: tensors[name] for name in names}
        entry.update(generated_latents=tensors[f"generated_latents.{k}"], generated_size=tensors[f"generated_size.{k}"])
        if image_features:
            if "image_features" not in tensors:
                raise BadInputError(f"feature cache file {path} has no CLIP features (non-square reference); see needs_clip_per_step")
            entry["image_features"] = tensors["image_features"]
        return entry

    def null_entry(self) -> dict[str, torch.Tensor]:
        """Zero-image CLIP features and empty-prompt embeddings (read once per process)."""
        if self._null is None:
            path = self.root / NULL_NAME
            if not path.is_file():
                raise BadInputError(f"feature cache {self.root} has no {NULL_NAME}; rebuild it")
            self._null = _read(path)
        return dict(self._null)

    def missing_files(self, pairs: Iterable[TrainingPair]) -> list[str]:
        """The cache files of `pairs` (and the null entry) this process cannot see, e.g. written on another node's local disk."""
        paths = [self.sample_path(sample) for sample in dict.fromkeys(pair.sample for pair in pairs)] + [self.root / NULL_NAME]
        return [path.name for path in paths if not path.is_file()]

    def has_clip_features(self, sample: str) -> bool:
        with safe_open(str(self.sample_path(sample)), framework="pt") as handle:
            return "image_features" in handle.keys()

    def needs_clip_per_step(self, pairs: Iterable[TrainingPair]) -> bool:
        """Whether items must carry CLIP pixels: some reference is non-square, so its CLIP crop is drawn each step."""
        return not all(self.has_clip_features(sample) for sample in {pair.sample for pair in pairs})

    def __getstate__(self) -> dict:
        return {"root": self.root, "prompt_fields": self.prompt_fields, "_null": None}


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise BadInputError(f"feature cache file {path} is unreadable ({error}); delete it and the next start rebuilds it") from None


class CachedEncoderOutputs:
    """The frozen encoders' outputs for a pair, read from the cache, with the item's dropout applied as the encoders would.

    With `clip_per_step` the item carries the reference's CLIP pixels instead of its features (the
    same crop as `EncoderInputs`), for the image encoder the step keeps.
    """

    def __init__(self, cache: FeatureCache, clip_per_step: bool) -> None:
        self.cache = cache
        self.clip_per_step = clip_per_step

    def __call__(self, pair: TrainingPair, drop_image: bool, drop_text: bool, generator: torch.Generator) -> dict[str, torch.Tensor]:
        entry = self.cache.read_pair(pair.sample, pair.generated_index, image_features=not self.clip_per_step)
        null = self.cache.null_entry()
        if self.clip_per_step:
            entry["clip_pixels"] = clip_input(pair, drop_image, generator)
        elif drop_image:
            entry["image_features"] = null["image_features"]
        if drop_text:
            entry.update({name: null[name] for name in self.cache.prompt_fields})
        return entry


@torch.no_grad()
def _encode_sample(encoders: FrozenEncoders, pairs: list[TrainingPair], resolution: int) -> dict[str, torch.Tensor]:
    reference = pairs[0]
    try:
        clip_pixels = clip_training_pixels(reference.reference_path, generator=None)
    except BadInputError:  # a non-square reference: its CLIP crop is drawn per step (see the module docstring)
        clip_pixels = None
    images = [load_training_image(reference.reference_path, resolution)]
    images += [load_training_image(pair.generated_path, resolution) for pair in pairs]
    latents = encoders.latents(torch.stack([pixels for pixels, _ in images]))
    prompt = encoders.encode_text([reference.prompt])
    tensors = {"reference_latents": latents[0], "reference_size": images[0][1], **{name: value[0] for name, value in prompt.items()}}
    if clip_pixels is not None:
        tensors["image_features"] = encoders.image_features(clip_pixels[None])[0]
    for pair, latent, (_, size) in zip(pairs, latents[1:], images[1:]):
        tensors[f"generated_latents.{pair.generated_index}"] = latent
        tensors[f"generated_size.{pair.generated_index}"] = size
    return tensors


@torch.no_grad()
def build_feature_cache(
    cache: FeatureCache,
    pairs: list[TrainingPair],
    encoders: FrozenEncoders,
    resolution: int,
    process_index: int = 0,
    num_processes: int = 1,
    show_progress: bool = True,
) -> int:
    """Encode this process's share of stale samples; process 0 also writes the null entry.

    Returns how many sample files this process wrote. Callers synchronise processes afterwards.
    """
    by_sample: dict[str, list[TrainingPair]] = {}
    for pair in pairs:
        by_sample.setdefault(pair.sample, []).append(pair)
    samples = list(by_sample)[process_index::num_processes]
    written = 0
    for sample in tqdm(samples, desc="feature cache", disable=not show_progress):
        sources = _sources(by_sample[sample])
        if cache.is_fresh(sample, sources):
            continue
        cache.write_sample(sample, _encode_sample(encoders, by_sample[sample], resolution), sources)
        written += 1
    null_path = cache.root / NULL_NAME
    if process_index == 0 and not null_path.is_file():
        null = {name: value[0] for name, value in encoders.encode_text([""]).items()}
        null["image_features"] = encoders.image_features(torch.zeros(1, 3, CLIP_SIZE, CLIP_SIZE))[0]
        null = {name: tensor.detach().cpu().contiguous() for name, tensor in null.items()}
        atomic_write(null_path, lambda tmp: save_file(null, str(tmp), metadata={"format": CACHE_FORMAT}))
    return written
