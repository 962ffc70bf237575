"""Batched generation from per-item seeds and per-subject image tokens.

An image is a function of the weights and of its own (subject, prompt, seed): its noise comes from
a CPU generator seeded with the item's seed and its tokens from its own subject, so batching and
sharding change nothing but float rounding. DreamBench inference and training-pair construction
both generate this way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from ip_adapter.ip_adapter import DEFAULT_NEGATIVE_PROMPT, ImagePromptAdapter


@dataclass(frozen=True)
class GenerationItem:
    """One image to generate; `seed` is derived from the subject and prompt, never from its position."""

    subject: str
    prompt: str
    seed: int


class SubjectTokens:
    """Image tokens per subject, computed on first use and kept.

    The 25 prompts of a subject share its tokens; recomputing them per batch would rerun the CLIP
    encoder and Resampler over 4-6 references each time and make a row's tokens depend on its batch.
    Several references are averaged into one row (the original setting); a single one (Kosmos-G) is
    used as is.
    """

    def __init__(self, ip_model: ImagePromptAdapter, load_references: Callable[[str], Sequence[Image.Image]]) -> None:
        self.ip_model = ip_model
        self.load_references = load_references
        self._tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, subject: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) tokens of the subject, each (1, num_tokens, C)."""
        if subject not in self._tokens:
            self._tokens[subject] = self.ip_model.get_image_embeds([list(self.load_references(subject))])
        return self._tokens[subject]


def generate_batch(
    ip_model: ImagePromptAdapter,
    tokens: SubjectTokens,
    items: Sequence[GenerationItem],
    num_inference_steps: int,
    *,
    scale: float,
    **pipeline_kwargs,
) -> list[Image.Image]:
    """One image per item at IP-Adapter scale `scale`; rows may belong to different subjects."""
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
        scale=scale,
        **pipeline_kwargs,
    )
