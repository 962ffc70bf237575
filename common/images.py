"""Image files: which names count as images, and decoding them eagerly so a bad file fails at load."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from common.errors import BadInputError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})


def is_image_file(path: Path) -> bool:
    """Images are recognised by extension; hidden files (e.g. unfinished atomic writes) never count."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def load_rgb_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image fully (so truncated files fail here, not later) and return it as RGB."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        detail = " ".join(str(exc).split())
        raise BadInputError(f"{path}: unreadable image ({type(exc).__name__}: {detail})") from None
