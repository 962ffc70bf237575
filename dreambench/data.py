"""Validated access to a DreamBench folder: reference images for scoring and for conditioning.

Layout (as published with the official code): `<root>/dataset/<subject>/NN.jpg` holds the photos and
`<root>/json_data/<subject>/NN.json` one grounding result per photo, whose `mask[1].box` is the
subject's box `[x0, y0, x1, y1]` in the coordinates of the photo resized to 800 pixels wide.

Two different views of the same photos are needed and must not be mixed up:
- scoring (CLIP-I, DINO) compares generations with the full, uncropped photos;
- conditioning the generator uses the subject crop, resized to 224 on a white square, exactly as the
  reference inference code prepares it (integer box, `int(v / 800 * width)`, see `scaled_box`).

A broken folder is reported before any model runs, as one line naming the offending path.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from common.errors import BadInputError
from common.images import is_image_file, load_rgb_image
from dreambench.benchmark import SUBJECTS, Subject, get_subject

BOX_REFERENCE_WIDTH = 800
CONDITIONING_SIZE = 224


@dataclass(frozen=True)
class ReferencePhoto:
    """One DreamBench photo with its subject box (800-pixel-wide coordinates, as stored)."""

    path: Path
    box: tuple[float, float, float, float]
    json_path: Path


def _read_box(json_path: Path) -> tuple[float, float, float, float]:
    expected = "expected a JSON object whose mask[1].box is [x0, y0, x1, y1] in 800-pixel-wide coordinates"
    try:
        data = json.loads(json_path.read_text())
        box = data["mask"][1]["box"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
        raise BadInputError(f"{json_path}: {expected} ({type(exc).__name__})") from None
    if (
        not isinstance(box, list)
        or len(box) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
        or not (box[0] < box[2] and box[1] < box[3])
    ):
        raise BadInputError(f"{json_path}: {expected}, got {box!r}")
    return tuple(float(v) for v in box)


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise BadInputError(f"{path}: {what} not found")


def subject_photos(root: str | os.PathLike, subject: str | Subject) -> list[ReferencePhoto]:
    """Validate one subject's photos and boxes (sorted by file name) and return them."""
    subject = subject if isinstance(subject, Subject) else get_subject(subject)
    root = Path(root)
    _require_dir(root, "DreamBench root")
    image_dir = root / "dataset" / subject.name
    json_dir = root / "json_data" / subject.name
    _require_dir(image_dir, f"DreamBench image folder of subject {subject.name!r} (<root>/dataset/<subject>/)")
    _require_dir(json_dir, f"DreamBench box folder of subject {subject.name!r} (<root>/json_data/<subject>/)")

    images: dict[str, Path] = {}
    for path in sorted(image_dir.iterdir()):
        if not is_image_file(path):
            continue
        if path.stem in images:
            raise BadInputError(f"{path}: two images named {path.stem!r} in {image_dir}")
        images[path.stem] = path
    boxes = {path.stem: path for path in sorted(json_dir.glob("*.json")) if not path.name.startswith(".")}
    if not images:
        raise BadInputError(f"{image_dir}: no images (expected NN.jpg files)")
    for stem, path in images.items():
        if stem not in boxes:
            raise BadInputError(f"{json_dir / (stem + '.json')}: missing box file for image {path}")
    for stem, path in boxes.items():
        if stem not in images:
            raise BadInputError(f"{image_dir / (stem + '.jpg')}: missing image for box file {path}")
    if subject.kosmosg_image not in images:
        raise BadInputError(f"{image_dir / (subject.kosmosg_image + '.jpg')}: Kosmos-G reference image of {subject.name!r} not found")
    return [ReferencePhoto(images[stem], _read_box(boxes[stem]), boxes[stem]) for stem in sorted(images)]


def validate_dreambench(root: str | os.PathLike) -> None:
    """Check the whole benchmark folder (all 30 subjects) so a long run cannot fail half-way."""
    root = Path(root)
    _require_dir(root, "DreamBench root")
    _require_dir(root / "dataset", "DreamBench image folder (<root>/dataset)")
    _require_dir(root / "json_data", "DreamBench box folder (<root>/json_data)")
    for subject in SUBJECTS:
        subject_photos(root, subject)


def reference_photos(root: str | os.PathLike, subject: str | Subject, kosmosg: bool) -> list[ReferencePhoto]:
    """All photos of the subject (original setting) or only its Kosmos-G image."""
    subject = subject if isinstance(subject, Subject) else get_subject(subject)
    photos = subject_photos(root, subject)
    if kosmosg:
        photos = [photo for photo in photos if photo.path.stem == subject.kosmosg_image]
    return photos


def load_reference_images(root: str | os.PathLike, subject: str | Subject, kosmosg: bool) -> list[Image.Image]:
    """Full, uncropped reference photos: what CLIP-I and DINO compare generations against."""
    return [load_rgb_image(photo.path) for photo in reference_photos(root, subject, kosmosg)]


def scaled_box(box: tuple[float, float, float, float], width: int) -> tuple[int, int, int, int]:
    """The subject box in pixels of a `width`-wide photo, computed exactly as the reference code does.

    The reference truncates the stored box to integers, then computes `int(v / 800 * width)`.
    The operation order matters in floating point: `v * width / 800` moves a box edge by one pixel
    on backpack_dog/04.jpg and robot_toy/04.jpg, so the order is kept (tested on all 158 photos).
    """
    return tuple(int(math.trunc(v) / BOX_REFERENCE_WIDTH * width) for v in box)


def crop_to_box(image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    """Crop the subject box, scaling it from 800-pixel-wide coordinates to the image width (`scaled_box`)."""
    x0, y0, x1, y1 = scaled_box(box, image.width)
    if x1 <= x0 or y1 <= y0:
        raise BadInputError(f"subject box {list(box)} is empty on a {image.width}x{image.height} image")
    return image.crop((x0, y0, x1, y1))


def resize_and_pad(image: Image.Image, size: int = CONDITIONING_SIZE) -> Image.Image:
    """Fit the longer side to `size` (bilinear, aspect kept) and centre it on a white square."""
    aspect = image.width / image.height
    if aspect > 1.0:
        width, height = size, max(1, int(size / aspect))
    else:
        width, height = max(1, int(size * aspect)), size
    resized = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(resized, ((size - width) // 2, (size - height) // 2))
    return canvas


def check_boxes_inside_photos(photos: list[ReferencePhoto]) -> list[ReferencePhoto]:
    """Each subject box lies inside its photo (read from the image header); returns `photos`.

    PIL pads a crop outside the image with black, so a wrong box would silently condition the
    generator on a black image.
    """
    for photo in photos:
        try:
            with Image.open(photo.path) as image:
                width, height = image.size
        except (OSError, Image.DecompressionBombError) as exc:
            raise BadInputError(f"{photo.path}: unreadable image ({type(exc).__name__})") from None
        x0, y0, x1, y1 = photo.box
        bottom = BOX_REFERENCE_WIDTH * height / width
        if x0 < 0 or y0 < 0 or x1 > BOX_REFERENCE_WIDTH or y1 > bottom:
            raise BadInputError(
                f"{photo.json_path}: subject box {list(photo.box)} lies outside its {width}x{height} photo {photo.path.name} "
                f"(which spans [0, 0, {BOX_REFERENCE_WIDTH}, {bottom:g}] in 800-pixel-wide box coordinates)"
            )
    return photos


def load_conditioning_images(root: str | os.PathLike, subject: str | Subject, kosmosg: bool) -> list[Image.Image]:
    """Box-cropped, padded 224x224 subject images that condition the generator (never used for scoring)."""
    images = []
    for photo in check_boxes_inside_photos(reference_photos(root, subject, kosmosg)):
        image = load_rgb_image(photo.path)
        try:
            crop = crop_to_box(image, photo.box)
        except ValueError as exc:
            raise BadInputError(f"{photo.json_path}: {exc}") from None
        images.append(resize_and_pad(crop))
    return images
