"""Your own subject: photos in, personalized images out (`generate.py`), scored like DreamBench.

A user's photos are loaded as they see them (`common.images.load_photo`), optionally cropped to a
box, and padded to a white square as DreamBench's conditioning images are; several photos are
averaged into one subject. Every (checkpoint, prompt, image) gets its own seed from (seed, prompt,
image index), the same for every checkpoint, so a side-by-side sheet compares checkpoints on the
same noise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers.utils import make_image_grid
from PIL import Image

from common.batching import generate_and_save
from common.errors import BadInputError
from common.images import is_image_file, load_photo
from common.io import atomic_save_image
from common.seeds import stable_seed
from dreambench.data import resize_and_pad
from dreambench.evaluation import score_images
from dreambench.metrics import load_clip, load_dino
from ip_adapter.batch_generation import GenerationItem, SubjectTokens, generate_batch
from ip_adapter.ip_adapter import IPAdapterPlusXL

SHEETS_DIR = "sheets"
_PROMPT_STEM_BYTES = 80
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]+")  # separators, NUL and control characters, and Windows' reserved set


def find_photos(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The photos among `paths` (files, or folders searched one level deep), in the order given then by name."""
    photos: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            photos += sorted(child for child in path.iterdir() if is_image_file(child))
        elif path.is_file():
            photos.append(path)
        else:
            raise BadInputError(f"--reference_images {path}: no such file or folder")
    if not photos:
        raise BadInputError(f"--reference_images {' '.join(map(str, paths))}: no photos (.jpg, .jpeg, .png, .webp) found")
    return photos


def load_boxes(path: str | os.PathLike | None) -> dict[str, tuple[int, int, int, int]]:
    """`{"photo file name": [x0, y0, x1, y1]}` in the photo's pixels (after EXIF rotation); a photo without one is used whole."""
    if path is None:
        return {}
    try:
        boxes = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadInputError(f"--boxes {path}: unreadable JSON ({type(error).__name__})") from None
    if not isinstance(boxes, dict) or not all(
        isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box) for box in boxes.values()
    ):
        raise BadInputError(f'--boxes {path}: expected {{"photo.jpg": [x0, y0, x1, y1], ...}} in pixels')
    return {name: tuple(int(v) for v in box) for name, box in boxes.items()}


def conditioning_images(photos: Sequence[Path], boxes: dict[str, tuple[int, int, int, int]]) -> list[Image.Image]:
    """Each photo (cropped to its box if it has one) padded to a white 224 square, as DreamBench's conditioning images."""
    unknown = sorted(set(boxes) - {photo.name for photo in photos})
    if unknown:
        raise BadInputError(f"--boxes names photos that are not among --reference_images: {', '.join(unknown)}")
    images = []
    for photo in photos:
        image = load_photo(photo)
        box = boxes.get(photo.name)
        if box is not None:
            x0, y0, x1, y1 = box
            if not (0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height):
                raise BadInputError(f"--boxes: the box {list(box)} of {photo} is not inside its {image.width}x{image.height} pixels")
            image = image.crop(box)
        images.append(resize_and_pad(image))
    return images


def read_prompts(prompts: Sequence[str], prompts_file: str | os.PathLike | None) -> list[str]:
    """`--prompts` then the lines of `--prompts_file` (blank and `#` lines skipped), each once, in order."""
    found = list(prompts)
    if prompts_file is not None:
        try:
            lines = Path(prompts_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise BadInputError(f"--prompts_file {prompts_file}: unreadable ({type(error).__name__})") from None
        found += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    found = [prompt for prompt in dict.fromkeys(found) if prompt.strip()]
    if not found:
        raise BadInputError("no prompt: give --prompts and/or --prompts_file")
    return found


def prompt_stem(prompt: str) -> str:
    """A file-name stem for any prompt: readable, at most ~90 bytes, and distinct for distinct prompts (a digest suffix)."""
    readable = " ".join(_UNSAFE.sub(" ", prompt).split()).lstrip(". ") or "prompt"
    readable = readable.encode("utf-8")[:_PROMPT_STEM_BYTES].decode("utf-8", "ignore").rstrip()
    return f"{readable}-{hashlib.sha256(prompt.encode('utf-8')).hexdigest()[:8]}"


def checkpoint_labels(checkpoints: Sequence[str | os.PathLike]) -> list[str]:
    """One folder name per checkpoint, in order: `0-ip-adapter-plus_sdxl_vit-h`, `1-checkpoint-30000` (for .../checkpoint-30000/model.bin)."""
    labels = []
    for index, checkpoint in enumerate(checkpoints):
        path = Path(str(checkpoint))
        name = path.parent.name if path.stem == "model" and path.parent.name else path.stem
        labels.append(f"{index}-{prompt_stem(name).rsplit('-', 1)[0]}")
    return labels


@dataclass(frozen=True)
class ImageJob:
    """One image: a checkpoint (its label), a prompt and the image's index; the seed never depends on the checkpoint."""

    label: str
    prompt: str
    index: int
    seed: int

    def path(self, output_dir: str | os.PathLike) -> Path:
        return Path(output_dir) / self.label / f"{prompt_stem(self.prompt)}_{self.index}.png"


def build_jobs(labels: Sequence[str], prompts: Sequence[str], num_images: int, seed: int) -> list[ImageJob]:
    return [
        ImageJob(label, prompt, index, stable_seed(seed, "your_subject", prompt, index))
        for label in labels
        for prompt in prompts
        for index in range(num_images)
    ]


def write_sheets(output_dir: Path, labels: Sequence[str], prompts: Sequence[str], num_images: int) -> list[Path]:
    """Per prompt, one sheet: a row per image index, a column per checkpoint (in `labels` order)."""
    sheets = []
    for prompt in prompts:
        tiles = [
            Image.open(ImageJob(label, prompt, index, 0).path(output_dir)).convert("RGB") for index in range(num_images) for label in labels
        ]
        sheets.append(
            atomic_save_image(
                make_image_grid(tiles, rows=num_images, cols=len(labels)), output_dir / SHEETS_DIR / f"{prompt_stem(prompt)}.png"
            )
        )
    return sheets


def generate_jobs(
    model: IPAdapterPlusXL,
    checkpoints: Sequence[Path],
    labels: Sequence[str],
    pending: Sequence[ImageJob],
    references: Sequence[Image.Image],
    output_dir: Path,
    batch_size: int,
    num_inference_steps: int,
    *,
    scale: float,
    share: Callable[[list[ImageJob]], contextlib.AbstractContextManager[list[ImageJob]]],
    position: int = 0,
    **pipeline_kwargs: Any,
) -> None:
    """Per checkpoint: swap its weights in, then generate this process's `share` of its pending images, saved batch by batch."""
    for checkpoint, label in zip(checkpoints, labels, strict=True):
        model.load_checkpoint(checkpoint)
        tokens = SubjectTokens(model, lambda subject: references)  # per checkpoint: its Resampler makes other tokens
        with share([job for job in pending if job.label == label]) as mine:
            generate_and_save(
                mine,
                batch_size,
                lambda batch, tokens=tokens: generate_batch(
                    model,
                    tokens,
                    [GenerationItem("photos", job.prompt, job.seed) for job in batch],
                    num_inference_steps,
                    scale=scale,
                    **pipeline_kwargs,
                ),
                lambda job: job.path(output_dir),
                f"{label} [{position}]",
                position,
            )


def score_checkpoints(
    output_dir: Path, jobs: Sequence[ImageJob], photos: Sequence[Path], clip_model: str, dino_model: str, device: Any, batch_size: int = 25
) -> dict[str, dict[str, float]]:
    """Per checkpoint: CLIP-T against the prompts, CLIP-I and DINO against your photos as taken, with DreamBench's metric code."""
    clip, preprocess = load_clip(clip_model, device)
    dino = load_dino(dino_model, device)
    taken = [load_photo(photo) for photo in photos]
    scores = {}
    for label in dict.fromkeys(job.label for job in jobs):
        mine = [job for job in jobs if job.label == label]
        images = [load_photo(job.path(output_dir), min_side=1) for job in mine]
        scores[label] = score_images([job.prompt for job in mine], images, taken, clip, preprocess, dino, batch_size)
    return scores
