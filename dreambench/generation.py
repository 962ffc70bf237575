"""Batched DreamBench generation: (subject, prompt) work items -> `<output_dir>/<subject>/<prompt>.png`.

Every image is a function of the weights and of its own (subject, prompt, seed) only: its noise comes
from a generator seeded with `stable_seed(seed, subject, prompt)` and its image tokens from its own
subject. How the items are spread over processes or grouped into batches therefore changes nothing
but float rounding, which is what lets a run be sharded over any number of GPUs, mix subjects within
a batch, and resume by simply skipping the images that already exist.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from common.batching import generate_and_save
from common.errors import BadInputError
from common.filenames import file_name_problem
from common.seeds import stable_seed
from ip_adapter.batch_generation import GenerationItem, SubjectTokens, generate_batch
from ip_adapter.ip_adapter import ImagePromptAdapter

IMAGE_SUFFIX = ".png"


def image_path(output_dir: str | os.PathLike, subject: str, prompt: str) -> Path:
    """Where the image of a prompt lives; the prompt is the file name, as in the official layout."""
    problem = file_name_problem(prompt, len(IMAGE_SUFFIX))
    if problem is not None:
        raise BadInputError(f"prompt {prompt[:80]!r} of subject {subject!r} cannot be a file name: {problem}")
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
    return [item for item in items if not image_path(output_dir, item.subject, item.prompt).is_file()]


def generate_items(
    ip_model: ImagePromptAdapter,
    tokens: SubjectTokens,
    items: Sequence[GenerationItem],
    output_dir: str | os.PathLike,
    batch_size: int,
    num_inference_steps: int,
    *,
    scale: float,
    progress_position: int = 0,
    **pipeline_kwargs,
) -> int:
    """Generate `items` at IP-Adapter scale `scale` and save them atomically batch by batch; returns the count."""
    return generate_and_save(
        items,
        batch_size,
        lambda batch: generate_batch(ip_model, tokens, batch, num_inference_steps, scale=scale, **pipeline_kwargs),
        lambda item: image_path(output_dir, item.subject, item.prompt),
        desc=f"process {progress_position}",
        position=progress_position,
    )
