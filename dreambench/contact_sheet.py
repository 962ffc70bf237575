"""One image per subject to eyeball a DreamBench run: the conditioning crops, then the generations.

Scores say how far a run is from the reference; a contact sheet says why (lost identity, ignored
prompt, broken images), and it is the first thing to look at after a run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageOps

from common.images import load_rgb_image
from common.io import atomic_save_image
from dreambench.generation import image_path

GRIDS_DIR = "grids"
BACKGROUND = (255, 255, 255)


def contact_sheet_path(output_dir: str | os.PathLike, subject: str) -> Path:
    return Path(output_dir) / GRIDS_DIR / f"{subject}.png"


def _fit(image: Image.Image, tile_size: int) -> Image.Image:
    """Scale up or down to fit the tile (224-pixel crops next to 1024-pixel generations), centred."""
    tile = Image.new("RGB", (tile_size, tile_size), BACKGROUND)
    fitted = ImageOps.contain(image.convert("RGB"), (tile_size, tile_size), Image.Resampling.BICUBIC)
    tile.paste(fitted, ((tile_size - fitted.width) // 2, (tile_size - fitted.height) // 2))
    return tile


def make_contact_sheet(
    references: Sequence[Image.Image],
    generations: Sequence[Image.Image],
    tile_size: int = 256,
    gap: int = 4,
) -> Image.Image:
    """References on the first row, generations row by row below them, in prompt order.

    Columns: enough for all references on one row and for a roughly square block of generations
    (25 prompts -> 5 columns when one reference is used, 6 for a subject with 6 references).
    """
    if not references and not generations:
        raise ValueError("a contact sheet needs at least one image")
    columns = max(len(references), math.ceil(math.sqrt(len(generations))), 1)
    rows = [list(references)] if references else []
    rows += [list(generations[start : start + columns]) for start in range(0, len(generations), columns)]
    step = tile_size + gap
    sheet = Image.new("RGB", (columns * step + gap, len(rows) * step + gap), BACKGROUND)
    for row_index, row in enumerate(rows):
        for column_index, image in enumerate(row):
            sheet.paste(_fit(image, tile_size), (gap + column_index * step, gap + row_index * step))
    return sheet


def write_contact_sheet(
    output_dir: str | os.PathLike,
    subject: str,
    references: Sequence[Image.Image],
    generations: Sequence[Image.Image],
    tile_size: int = 256,
) -> Path:
    return atomic_save_image(make_contact_sheet(references, generations, tile_size), contact_sheet_path(output_dir, subject))


def write_contact_sheets(
    output_dir: str | os.PathLike,
    subject_prompts: Mapping[str, Sequence[str]],
    load_references: Callable[[str], Sequence[Image.Image]],
    tile_size: int = 256,
) -> list[Path]:
    """One sheet per subject from its conditioning images and its generated prompts (all must exist)."""
    return [
        write_contact_sheet(
            output_dir,
            subject,
            load_references(subject),
            [load_rgb_image(image_path(output_dir, subject, prompt)) for prompt in prompts],
            tile_size,
        )
        for subject, prompts in subject_prompts.items()
    ]
