"""Splitting work lists into fixed-size batches, and the one generate-a-batch-then-save-it loop."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from PIL import Image
from tqdm.auto import tqdm

from common.io import atomic_save_image

T = TypeVar("T")


def batched(items: Sequence[T], batch_size: int) -> Iterator[Sequence[T]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def generate_and_save(
    items: Sequence[T],
    batch_size: int,
    generate: Callable[[Sequence[T]], Sequence[Image.Image]],
    path_of: Callable[[T], str | os.PathLike],
    desc: str,
    position: int = 0,
) -> int:
    """Generate `items` batch by batch and save each image atomically at `path_of(item)`; returns the count.

    Each image is saved as soon as its batch is done, so an interrupted run loses at most one batch
    and a resumed run (which skips the files on disk) never reads a half-written one.
    """
    written = 0
    with tqdm(total=len(items), desc=desc, unit="img", position=position) as bar:
        for batch in batched(items, batch_size):
            for item, image in zip(batch, generate(batch), strict=True):
                atomic_save_image(image, path_of(item))
                written += 1
            bar.update(len(batch))
    return written
