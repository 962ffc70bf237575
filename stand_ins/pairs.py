"""Synthetic PatchDPO training data: `sample{i}/` image pairs and their quality-map file.

For tests and speed benchmarks, where no generated data set exists: images are smooth random
colour fields (so resizing and cropping change them measurably) and quality maps are uniform
random in [0, 1] at the latent grid, bound to the images written like real maps. The folder follows
`patch_quality.layout` exactly.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from patch_quality.layout import MANIFEST_NAME, QUALITY_MAPS_NAME, generated_path, reference_path, sample_dir
from patch_quality.store import hash_data_images, save_quality_maps

PROMPTS = ("a red backpack", "a toy robot", "a blue vase", "a plush bear", "a tea pot", "a round clock")


def random_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BILINEAR)


@dataclass(frozen=True)
class PairData:
    root: Path
    quality_file: Path
    num_samples: int


def save_pair_data(
    root: str | os.PathLike,
    num_samples: int,
    image_size: int,
    latent_size: int,
    generated_per_sample: int = 1,
    seed: int = 0,
    reference_sizes: dict[int, tuple[int, int]] | None = None,
    map_size: int | None = None,
    image_pool: Sequence[Path] = (),
) -> PairData:
    """Write `num_samples` samples; `reference_sizes` overrides (width, height) of some references
    and `map_size` the quality-map grid (to build a mismatching file on purpose).

    Generated images are slightly non-square so their original size differs from the reference's.
    With `image_pool`, the images are instead links to its files in turn (large images without
    the disk space: each path is still opened and decoded).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    maps = {}
    numbers = itertools.count()
    for index in range(num_samples):
        prompt = PROMPTS[index % len(PROMPTS)]
        folder = sample_dir(root, index)
        folder.mkdir(parents=True, exist_ok=True)
        width, height = (reference_sizes or {}).get(index, (image_size, image_size))
        _save_image(rng, reference_path(folder, prompt), (width, height), image_pool, next(numbers))
        for k in range(generated_per_sample):
            _save_image(rng, generated_path(folder, prompt, k), (image_size + 8, image_size), image_pool, next(numbers))
            grid = map_size or latent_size
            maps[(folder.name, k)] = tuple(torch.from_numpy(rng.random((grid, grid), dtype=np.float32)) for _ in range(2))
    quality_file = root / QUALITY_MAPS_NAME
    save_quality_maps(quality_file, maps, {"source": "stand_ins.pairs"}, hash_data_images(root, maps))
    (root / MANIFEST_NAME).write_text(json.dumps({"made_by": "stand_ins.pairs"}))
    return PairData(root, quality_file, num_samples)


def _save_image(rng: np.random.Generator, path: Path, size: tuple[int, int], image_pool: Sequence[Path], number: int) -> None:
    if image_pool:
        path.symlink_to(image_pool[number % len(image_pool)])
    else:
        random_image(rng, *size).save(path)
