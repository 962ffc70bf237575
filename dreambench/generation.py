"""Batched DreamBench generation: (subject, prompt) work items -> `<output_dir>/<subject>/<prompt>.png`.

Every image is a function of the weights and of its own (subject, prompt, seed) only: its noise comes
from a generator seeded with `stable_seed(seed, subject, prompt)` and its image tokens from its own
subject. How the items are spread over processes or grouped into batches therefore changes nothing
but float rounding, which is what lets a run be sharded over any number of GPUs, mix subjects within
a batch, and resume by simply skipping the images that already exist.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ip_adapter.ip_adapter import DEFAULT_NEGATIVE_PROMPT, IPAdapterPlusXL
from ip_adapter.utils import atomic_save_image, stable_seed

IMAGE_SUFFIX = ".png"
# `ip_adapter.utils.atomic_path` names its temporary files `.<name>.<random>.tmp<suffix>`.
TEMP_FILE_GLOB = f".*.tmp{IMAGE_SUFFIX}"


@dataclass(frozen=True)
class GenerationItem:
    """One image to generate; `seed` is derived from the subject and prompt, never from its position."""

    subject: str
    prompt: str
    seed: int

    def path(self, output_dir: str | os.PathLike) -> Path:
        return image_path(output_dir, self.subject, self.prompt)


def image_path(output_dir: str | os.PathLike, subject: str, prompt: str) -> Path:
    """Where the image of a prompt lives; the prompt is the file name, as in the official layout."""
    if not prompt or prompt.startswith(".") or "/" in prompt or "\\" in prompt:
        raise ValueError(f"prompt {prompt!r} of subject {subject!r} cannot be a file name (empty, leading '.', or a path separator)")
    return Path(output_dir) / subject / f"{prompt}{IMAGE_SUFFIX}"


def build_items(subject_prompts: Mapping[str, Sequence[str]], seed: int) -> list[GenerationItem]:
    """All items in subject-major order, so contiguous shards and batches reuse a subject's tokens."""
    return [
        GenerationItem(subject, prompt, stable_seed(seed, subject, prompt))
        for subject, prompts in subject_prompts.items()
        for prompt in prompts
    ]


def pending_items(items: Iterable[GenerationItem], output_dir: str | os.PathLike) -> list[GenerationItem]:
    """Items whose image is not on disk yet. Images are written atomically, so any file is complete."""
    return [item for item in items if not item.path(output_dir).is_file()]


def remove_stale_temp_files(output_dir: str | os.PathLike, folders: Iterable[str]) -> list[Path]:
    """Delete the temporary files a killed run left behind in the given sub-folders of `output_dir`.

    Only call this while no process is writing: a live writer's temporary file matches the pattern too.
    """
    removed = []
    for folder in folders:
        directory = Path(output_dir) / folder
        if directory.is_dir():
            for path in sorted(directory.glob(TEMP_FILE_GLOB)):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def batched(items: Sequence[GenerationItem], batch_size: int) -> Iterator[Sequence[GenerationItem]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


class SubjectTokens:
    """Image tokens per subject, computed on first use and kept.

    The 25 prompts of a subject share its tokens; recomputing them per batch would rerun the CLIP
    encoder and Resampler over 4-6 references each time and make a row's tokens depend on its batch.
    Several references are averaged into one row (the original setting); a single one (Kosmos-G) is
    used as is.
    """

    def __init__(self, ip_model: IPAdapterPlusXL, load_references: Callable[[str], Sequence[Image.Image]]) -> None:
        self.ip_model = ip_model
        self.load_references = load_references
        self._tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, subject: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) tokens of the subject, each (1, num_tokens, C)."""
        if subject not in self._tokens:
            self._tokens[subject] = self.ip_model.get_image_embeds([list(self.load_references(subject))])
        return self._tokens[subject]


def generate_batch(
    ip_model: IPAdapterPlusXL,
    tokens: SubjectTokens,
    items: Sequence[GenerationItem],
    num_inference_steps: int,
    **pipeline_kwargs,
) -> list[Image.Image]:
    """One image per item; rows may belong to different subjects."""
    cond = torch.cat([tokens(item.subject)[0] for item in items])
    uncond = torch.cat([tokens(item.subject)[1] for item in items])
    # CPU generators: the noise of an item is the same on every device type, not just every process.
    generators = [torch.Generator("cpu").manual_seed(item.seed) for item in items]
    return ip_model.generate_from_tokens(
        cond,
        uncond,
        [item.prompt for item in items],
        [DEFAULT_NEGATIVE_PROMPT] * len(items),
        generators,
        num_inference_steps,
        **pipeline_kwargs,
    )


def generate_items(
    ip_model: IPAdapterPlusXL,
    tokens: SubjectTokens,
    items: Sequence[GenerationItem],
    output_dir: str | os.PathLike,
    batch_size: int,
    num_inference_steps: int,
    progress_position: int = 0,
    **pipeline_kwargs,
) -> int:
    """Generate and atomically save `items` batch by batch; returns the number of images written.

    Each image is saved as soon as its batch is done, so an interrupted run loses at most one batch.
    """
    written = 0
    with tqdm(total=len(items), desc=f"process {progress_position}", unit="img", position=progress_position) as bar:
        for batch in batched(items, batch_size):
            images = generate_batch(ip_model, tokens, batch, num_inference_steps, **pipeline_kwargs)
            for item, image in zip(batch, images, strict=True):
                atomic_save_image(image, item.path(output_dir))
                written += 1
            bar.update(len(batch))
    return written
