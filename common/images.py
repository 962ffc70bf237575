"""Image files: which names count as images, and decoding them eagerly so a bad file fails at load.

`load_rgb_image` reads files this project wrote (generations, DreamBench as the official code reads
it). `load_photo` reads a person's photo the way they see it on their screen.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from common.errors import BadInputError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})


def is_image_file(path: Path) -> bool:
    """Images are recognised by extension; hidden files (e.g. unfinished atomic writes) never count."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def load_rgb_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image fully (so truncated files fail here, not later) and return it as RGB."""
    return _decode_rgb(path, path)


def load_rgb_image_and_sha256(path: str | os.PathLike) -> tuple[Image.Image, str]:
    """`load_rgb_image` and the SHA-256 of the bytes it decoded: one read, so the digest names exactly the image decoded."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise _unreadable(path, exc) from None
    return _decode_rgb(io.BytesIO(data), path), hashlib.sha256(data).hexdigest()


def _decode_rgb(source: str | os.PathLike | io.BytesIO, path: str | os.PathLike) -> Image.Image:
    try:
        with Image.open(source) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path: str | os.PathLike, exc: Exception) -> BadInputError:
    detail = " ".join(str(exc).split())
    return BadInputError(f"{path}: unreadable image ({type(exc).__name__}: {detail})")


MIN_PHOTO_SIDE = 64  # smaller than the CLIP and DINO inputs by far: an icon, not a photo of a subject
_WHITE = (255, 255, 255)


def load_photo(path: str | os.PathLike, min_side: int = MIN_PHOTO_SIDE) -> Image.Image:
    """A user's photo as RGB, as they see it: EXIF orientation applied, transparency on white, 16-bit scaled.

    `.convert("RGB")` alone stores a phone photo sideways, turns a transparent background black
    (the method assumes white) and a 16-bit grayscale PNG pure white.
    """
    try:
        with Image.open(path) as image:
            image.load()
            photo = _as_rgb(ImageOps.exif_transpose(image))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        detail = " ".join(str(exc).split())
        raise BadInputError(f"{path}: unreadable photo ({type(exc).__name__}: {detail})") from None
    if min(photo.size) < min_side:
        raise BadInputError(f"{path}: {photo.width}x{photo.height} pixels, expected a photo at least {min_side} pixels on each side")
    return photo


def _as_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I") or image.mode == "F":  # 16/32-bit integer or float grayscale
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) <= 65535):
            values = values / 257.0  # 16-bit: 65535 -> 255
        elif image.mode == "F" and values.max(initial=0) <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*_WHITE, 255)), rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK (Pillow undoes Adobe's inverted JPEG CMYK), YCbCr, RGB
