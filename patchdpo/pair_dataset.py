"""Training pairs (reference image, generated image k) of a PatchDPO data folder.

Randomness is stateless: every random choice of an item (CFG dropout, CLIP crop offset) comes
from a generator seeded with `(seed, epoch, item index)`, the item carries the seed of its
diffusion noise and timestep (`noise_seed`, keyed the same way), and `common.sampling.EpochSampler` shuffles with
`(seed, epoch)`. A pair is therefore trained the same way whichever process, micro-batch or
worker it lands in, whether features come from the cache, or whether the run was resumed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from base_models import BaseModelFamily
from common.errors import BadInputError
from common.seeds import stable_seed
from patch_quality.layout import list_samples, sample_files
from patch_quality.store import QualityMaps

CLIP_SIZE = 224


@dataclass(frozen=True)
class TrainingPair:
    sample: str  # sample folder name, the quality-map key
    generated_index: int  # the k of its `{prompt}_gen_{k}.png`
    prompt: str
    reference_path: Path
    generated_path: Path


@dataclass(frozen=True)
class DropoutRates:
    """Classifier-free-guidance dropout of the reference training (0.05 each); the flags are checked in `patchdpo.config`."""

    image: float = 0.05
    text: float = 0.05
    both: float = 0.05

    def draw(self, generator: torch.Generator) -> tuple[bool, bool]:
        """(drop_image, drop_text) from one uniform draw, in the reference's order of cases."""
        u = torch.rand((), generator=generator).item()
        if u < self.image:
            return True, False
        if u < self.image + self.text:
            return False, True
        if u < self.image + self.text + self.both:
            return True, True
        return False, False


def index_pairs(
    data_root: str | os.PathLike,
    quality_maps: QualityMaps | None,
    generated_per_sample: int,
    latent_size: int,
) -> list[TrainingPair]:
    """Every (sample, k < generated_per_sample) pair, checked up front.

    Only `sample*` folders count (the quality-map file and a manifest may sit next to them). A
    missing image, a missing quality-map entry or a map whose size is not the latent grid is a
    one-line error before any training starts.
    """
    samples = list_samples(data_root)
    if not samples:
        raise BadInputError(f"{data_root} holds no 'sample{{i}}' folders; expected the PatchDPO data layout")
    pairs = []
    for folder in samples:
        prompt, reference, generated = sample_files(folder)
        for k in range(generated_per_sample):
            if k not in generated:
                raise BadInputError(
                    f"{folder} has no generated image '{prompt}_gen_{k}.png' (needed for --generated_per_sample {generated_per_sample})"
                )
            if quality_maps is not None:
                if (folder.name, k) not in quality_maps:
                    raise BadInputError(f"{quality_maps.path} has no quality maps for sample {folder.name!r} k={k}")
                for role, shape in zip(("reference", "generated"), quality_maps.shapes(folder.name, k)):  # from the header
                    if shape != (latent_size, latent_size):
                        raise BadInputError(
                            f"{quality_maps.path}: {role} map of sample {folder.name!r} k={k} is {shape}, "
                            f"expected the latent size ({latent_size}, {latent_size}); remake them for this model and --resolution: "
                            f"python -m patch_quality.maps --data_root {data_root} --base_model_path <--pretrained_model_name_or_path> "
                            "--resolution <--resolution>"
                        )
            pairs.append(TrainingPair(folder.name, k, prompt, reference, generated[k]))
    return pairs


def load_training_image(path: Path, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels in [-1, 1] (3, R, R), original (H, W)): bilinear resize of the short side, centre crop."""
    with Image.open(path) as image:
        image = image.convert("RGB")
    size = torch.tensor([image.height, image.width], dtype=torch.float32)
    image = TF.center_crop(TF.resize(image, resolution, interpolation=TF.InterpolationMode.BILINEAR), resolution)
    return TF.normalize(TF.to_tensor(image), [0.5], [0.5]), size


def clip_training_pixels(path: Path, generator: torch.Generator | None) -> torch.Tensor:
    """CLIP input of the reference training: Resize(224) of the whole image, RandomCrop(224).

    Unlike inference (bicubic, centre crop), training uses bilinear and a random crop offset; for a
    square image the crop is the whole resized image and nothing is drawn. `generator=None`
    asks for a square image.
    """
    with Image.open(path) as image:
        image = TF.resize(image.convert("RGB"), CLIP_SIZE, interpolation=TF.InterpolationMode.BILINEAR)
    top = left = 0
    if image.size != (CLIP_SIZE, CLIP_SIZE):
        if generator is None:
            raise BadInputError(f"{path} is {image.width}x{image.height} after resizing, not square: its CLIP crop is random")
        top = int(torch.randint(0, image.height - CLIP_SIZE + 1, (), generator=generator))
        left = int(torch.randint(0, image.width - CLIP_SIZE + 1, (), generator=generator))
    image = TF.crop(image, top, left, CLIP_SIZE, CLIP_SIZE)
    return TF.normalize(TF.to_tensor(image), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


class EncoderPayload(Protocol):
    """What an item carries for the frozen encoders: their inputs (`EncoderInputs`) or their outputs (`feature_cache.CachedEncoderOutputs`)."""

    def __call__(self, pair: TrainingPair, drop_image: bool, drop_text: bool, generator: torch.Generator) -> dict[str, torch.Tensor]: ...


def clip_input(pair: TrainingPair, drop_image: bool, generator: torch.Generator) -> torch.Tensor:
    """The reference's CLIP pixels, zeroed when the image is dropped (the reference zeroes the normalised CLIP input)."""
    clip_pixels = clip_training_pixels(pair.reference_path, generator)
    return torch.zeros_like(clip_pixels) if drop_image else clip_pixels


@dataclass(frozen=True)
class EncoderInputs:
    """Pixels and token ids, for the frozen encoders to run on each step."""

    resolution: int
    family: BaseModelFamily
    tokenizers: tuple

    def __call__(self, pair: TrainingPair, drop_image: bool, drop_text: bool, generator: torch.Generator) -> dict[str, torch.Tensor]:
        reference_pixels, reference_size = load_training_image(pair.reference_path, self.resolution)
        generated_pixels, generated_size = load_training_image(pair.generated_path, self.resolution)
        clip_pixels = clip_input(pair, drop_image, generator)
        token_ids = self.family.tokenize(self.tokenizers, ["" if drop_text else pair.prompt])
        return {
            "reference_pixels": reference_pixels,
            "generated_pixels": generated_pixels,
            "reference_size": reference_size,
            "generated_size": generated_size,
            "clip_pixels": clip_pixels,
            **{name: ids[0] for name, ids in token_ids.items()},
        }


class PairDataset(Dataset):
    """Items of one pair, indexed by `(index, epoch)` from `EpochSampler`.

    An item is what its `source` gives for the pair (the encoders' inputs, or their cached outputs
    with the dropout applied), plus the quality maps (zeros when `quality_maps` is None), the
    dropout flags and the noise seed. Every random draw comes from the item's own generator, so
    both sources give the same pair the same dropout and CLIP crop.
    """

    def __init__(
        self,
        pairs: list[TrainingPair],
        latent_size: int,
        seed: int,
        source: EncoderPayload,
        quality_maps: QualityMaps | None = None,
        dropout: DropoutRates = DropoutRates(),
    ) -> None:
        self.pairs = pairs
        self.latent_size = latent_size
        self.seed = seed
        self.source = source
        self.quality_maps = quality_maps
        self.dropout = dropout

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, epoch = key
        pair = self.pairs[index]
        generator = torch.Generator().manual_seed(stable_seed(self.seed, "item", epoch, index))
        drop_image, drop_text = self.dropout.draw(generator)
        item = self.source(pair, drop_image, drop_text, generator)
        if self.quality_maps is not None:
            item["reference_map"], item["generated_map"] = self.quality_maps.get(pair.sample, pair.generated_index)
        else:
            item["reference_map"] = item["generated_map"] = torch.zeros(self.latent_size, self.latent_size)
        item["index"] = torch.tensor(index)  # names the batch's samples if its step goes non-finite
        item["drop_image"] = torch.tensor(drop_image)
        item["drop_text"] = torch.tensor(drop_text)
        item["noise_seed"] = torch.tensor(stable_seed(self.seed, "noise", epoch, index))
        return item
