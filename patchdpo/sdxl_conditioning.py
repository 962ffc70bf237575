"""SDXL's non-image conditioning for training: two-encoder prompt embeddings and size time ids.

Prompt embeddings follow the SDXL pipeline: the penultimate hidden states of both CLIP text
encoders concatenated on the channel axis (768 + 1280 = 2048 for SDXL), and the projected pooled
output of the second encoder as `text_embeds`.

Time ids, and why the reference training's are wrong
----------------------------------------------------
The UNet reads `added_cond_kwargs["time_ids"]` as one row of six numbers per latent,
`(original_h, original_w, crop_top, crop_left, target_h, target_w)`, and does
`add_time_proj(time_ids.flatten()).reshape(batch, -1)`: whatever shape it is given, the ids are
taken in flattened order, six per latent row.

The official `train_patchdpo.py` stacks per pair `original_size = [[H_ref, W_ref], [H_gen, W_gen]]`,
`crop = [[0, 0], [0, 0]]`, `target = [[R, R], [R, R]]` into (B, 2, 2) tensors and concatenates
them along dim 1, giving (B, 6, 2). Flattened, pair i contributes twelve numbers
`H_ref W_ref H_gen W_gen 0 0 0 0 R R R R`, which the UNet cuts into two rows:

    row 2i   = (H_ref_i, W_ref_i, H_gen_i, W_gen_i, 0, 0)   original=(H_ref, W_ref), crop=(H_gen, W_gen), target=(0, 0)
    row 2i+1 = (0, 0, R, R, R, R)                           original=(0, 0), crop=(R, R), target=(R, R)

while the latent batch is ordered `[ref_0 .. ref_{B-1}, gen_0 .. gen_{B-1}]`. So latent n gets row
n of that list: the rows go to the wrong images (ref_1 gets pair 0's second row, gen_0 gets pair
B/2's first row, ...) and every row is scrambled (a crop offset equal to the other image's size,
a zero original size, a zero target size). The correctly split (2B, 2) tensors the script computes
just before are never used. The released PatchDPO weights were trained with these ids, so
`official=True` reproduces them exactly for comparisons; the default gives each latent its own
`(H, W, 0, 0, R, R)`, what SDXL was trained with and what the pipeline feeds at inference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from common.errors import BadInputError


def tokenize_prompts(tokenizers: tuple[CLIPTokenizer, CLIPTokenizer], prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 77) token ids for each tokenizer, padded to its max length as the pipeline does."""
    return tuple(
        tokenizer(
            list(prompts),
            max_length=tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids
        for tokenizer in tokenizers
    )


@torch.no_grad()
def encode_prompts(
    text_encoders: tuple[CLIPTextModel, CLIPTextModelWithProjection],
    input_ids: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (N, 77, D1 + D2), pooled_prompt_embeds (N, D2)) in the encoders' dtype."""
    text_encoder, text_encoder_2 = text_encoders
    ids, ids_2 = input_ids
    hidden = text_encoder(ids.to(text_encoder.device), output_hidden_states=True).hidden_states[-2]
    output_2 = text_encoder_2(ids_2.to(text_encoder_2.device), output_hidden_states=True)
    prompt_embeds = torch.cat([hidden, output_2.hidden_states[-2]], dim=-1)
    return prompt_embeds, output_2.text_embeds


def pair_time_ids(reference_sizes: torch.Tensor, generated_sizes: torch.Tensor, resolution: int, official: bool = False) -> torch.Tensor:
    """(2B, 6) time ids for the latent batch `[references; generated]`.

    `reference_sizes` / `generated_sizes` are (B, 2) original (H, W) of each image. Default: each
    latent's own `(H, W, 0, 0, R, R)`. `official=True`: the reference training's layout (see the
    module docstring), the exact numbers its UNet saw.
    """
    if reference_sizes.shape != generated_sizes.shape or reference_sizes.ndim != 2 or reference_sizes.shape[1] != 2:
        raise BadInputError(
            f"expected (B, 2) original sizes for both halves, got {tuple(reference_sizes.shape)} and {tuple(generated_sizes.shape)}"
        )
    reference_sizes = reference_sizes.float()
    generated_sizes = generated_sizes.float()
    batch = reference_sizes.shape[0]
    if official:
        original = torch.stack([reference_sizes, generated_sizes], dim=1)  # (B, 2, 2)
        crop = torch.zeros_like(original)
        target = torch.full_like(original, float(resolution))
        # The UNet flattens time ids and takes six per latent row; a reshape is that same reading.
        return torch.cat([original, crop, target], dim=1).reshape(2 * batch, 6)
    original = torch.cat([reference_sizes, generated_sizes], dim=0)  # (2B, 2)
    crop = torch.zeros_like(original)
    target = torch.full_like(original, float(resolution))
    return torch.cat([original, crop, target], dim=1)
