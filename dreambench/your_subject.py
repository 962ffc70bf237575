"""Your own subject: photos in, personalized images out (`generate.py`), scored like DreamBench.

A user's photos are loaded as they see them (`common.images.load_photo`), optionally cropped to a
box, and padded to a white square as DreamBench's conditioning images are; several photos are
averaged into one subject. Photos are known by path and content (`Photo`): two `1.jpg` in two
folders are two photos, and a changed photo or box is another subject, whose images are all made
again (`subject_changes`). Every (checkpoint, prompt, image) gets its own seed from (seed, prompt,
image index), the same for every checkpoint, so a side-by-side sheet compares checkpoints on the
same noise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers.utils import make_image_grid
from PIL import Image

from common.batching import generate_and_save
from common.errors import BadInputError
from common.images import is_image_file, load_photo
from common.io import atomic_save_image, sha256_file
from common.seeds import stable_seed
from dreambench.data import resize_and_pad
from dreambench.evaluation import clip_scores, dino_score
from dreambench.metrics import load_clip, load_dino
from ip_adapter.batch_generation import GenerationItem, SubjectTokens, generate_batch
from ip_adapter.ip_adapter import ImagePromptAdapter

SHEETS_DIR = "sheets"
_PROMPT_STEM_BYTES = 80
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|]+")  # separators, NUL and control characters, and Windows' reserved set


Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Photo:
    """One photo of the subject: where it is, what it holds (SHA-256) and the box it is cropped to (None: used whole)."""

    path: Path
    sha256: str
    box: Box | None = None

    def record(self) -> dict[str, Any]:
        return {"path": str(self.path.resolve()), "sha256": self.sha256, "box": None if self.box is None else list(self.box)}


def find_photos(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The photos among `paths` (files, or folders searched one level deep), in the order given then by name, each file once."""
    photos: dict[Path, Path] = {}
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(child for child in path.iterdir() if is_image_file(child))
        elif path.is_file():
            found = [path]
        else:
            raise BadInputError(f"--reference_images {path}: no such file or folder")
        for photo in found:
            photos.setdefault(photo.resolve(), photo)
    if not photos:
        raise BadInputError(f"--reference_images {' '.join(map(str, paths))}: no photos (.jpg, .jpeg, .png, .webp) found")
    return list(photos.values())


def load_boxes(path: str | os.PathLike | None) -> dict[str, Box]:
    """`{"photo": [x0, y0, x1, y1]}` in the photo's pixels (after EXIF rotation), as written; `assign_boxes` says which photo a key names."""
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


def assign_boxes(photos: Sequence[Path], boxes: dict[str, Box], source: str | os.PathLike | None = None) -> list[Box | None]:
    """Each photo's box (None: the whole photo).

    A key is a photo's path, absolute or relative to the current folder as `--reference_images`
    are, or a bare file name when exactly one photo has it: `a/1.jpg` and `b/1.jpg` are two photos
    and need their paths as keys.
    """
    resolved = [photo.resolve() for photo in photos]
    assigned: dict[int, str] = {}
    unknown = []
    for key in boxes:
        target = Path(key).expanduser().resolve()
        matches = [i for i, photo in enumerate(photos) if resolved[i] == target or (Path(key).name == key and photo.name == key)]
        if not matches:
            unknown.append(key)
        elif len(matches) > 1:
            named = ", ".join(str(photos[i]) for i in matches)
            raise BadInputError(f"--boxes {source}: {key!r} names {len(matches)} photos ({named}); key each box by its photo's path")
        elif matches[0] in assigned:
            raise BadInputError(f"--boxes {source}: {assigned[matches[0]]!r} and {key!r} both name {photos[matches[0]]}; keep one")
        else:
            assigned[matches[0]] = key
    if unknown:
        raise BadInputError(f"--boxes {source} names photos that are not among --reference_images: {', '.join(sorted(unknown))}")
    return [boxes[assigned[i]] if i in assigned else None for i in range(len(photos))]


def read_photos(reference_images: Sequence[str | os.PathLike], boxes: str | os.PathLike | None = None) -> list[Photo]:
    """The subject's photos (`--reference_images`) with their content digests and their boxes from the `--boxes` file."""
    paths = find_photos(reference_images)
    return [Photo(path, sha256_file(path), box) for path, box in zip(paths, assign_boxes(paths, load_boxes(boxes), boxes), strict=True)]


def conditioning_images(photos: Sequence[Photo]) -> list[Image.Image]:
    """Each photo (cropped to its box if it has one) padded to a white 224 square, as DreamBench's conditioning images."""
    images = []
    for photo in photos:
        image = load_photo(photo.path)
        if photo.box is not None:
            x0, y0, x1, y1 = photo.box
            if not (0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height):
                raise BadInputError(
                    f"--boxes: the box {list(photo.box)} of {photo.path} is not inside its {image.width}x{image.height} pixels"
                )
            image = image.crop(photo.box)
        images.append(resize_and_pad(image))
    return images


def subject_changes(recorded: Any, photos: Sequence[Photo]) -> list[str]:
    """How `photos` differ from the `recorded` ones (`Photo.record`s) as a subject; [] when the images made from those still stand.

    The photos are averaged into one subject, so every image (of every checkpoint and prompt)
    depends on every photo's content and box, and on their order (the float sum); not on where the
    files lie: the same photos moved or renamed are the same subject.
    """
    now = [photo.record() for photo in photos]
    if not (isinstance(recorded, list) and all(isinstance(entry, dict) for entry in recorded)):
        return ["the earlier photos were not recorded by path and content"]
    if [(entry.get("sha256"), entry.get("box")) for entry in recorded] == [(entry["sha256"], entry["box"]) for entry in now]:
        return []
    before = {entry.get("path"): entry for entry in recorded}
    changes = []
    for photo, entry in zip(photos, now, strict=True):
        old = before.pop(entry["path"], None)
        if old is None:
            changes.append(f"{photo.path}: added")
        elif old.get("sha256") != entry["sha256"]:
            changes.append(f"{photo.path}: other content")
        elif old.get("box") != entry["box"]:
            changes.append(f"{photo.path}: other box")
    changes += [f"{path}: removed" for path in before]
    return changes or ["another order"]


def remove_images(output_dir: Path, folders: Iterable[str]) -> None:
    """Delete the images in `folders` of `output_dir`: made from other photos, they must not pass for this subject's."""
    for folder in folders:
        if (output_dir / folder).is_dir():
            for path in (output_dir / folder).iterdir():
                if is_image_file(path):
                    path.unlink()


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
    model: ImagePromptAdapter,
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
    output_dir: Path,
    jobs: Sequence[ImageJob],
    photos: Sequence[Photo],
    clip_model: str | None,
    dino_model: str | None,
    device: Any,
    batch_size: int = 25,
) -> dict[str, dict[str, float]]:
    """Per checkpoint, the metrics of the models given, with DreamBench's metric code against your photos as taken.

    `clip_model` gives CLIP-T (against the prompts) and CLIP-I, `dino_model` DINO; either may be None.
    """
    clip = load_clip(clip_model, device) if clip_model is not None else None
    dino = load_dino(dino_model, device) if dino_model is not None else None
    taken = [load_photo(photo.path) for photo in photos]
    scores = {}
    for label in dict.fromkeys(job.label for job in jobs):
        mine = [job for job in jobs if job.label == label]
        images = [load_photo(job.path(output_dir), min_side=1) for job in mine]
        row = {} if clip is None else clip_scores([job.prompt for job in mine], images, taken, *clip, batch_size)
        scores[label] = row if dino is None else {**row, "dino_score": dino_score(images, taken, dino, batch_size)}
    return scores
