"""FLUX latents: normalisation, the 2x2 packing into transformer tokens, image ids, and patch weights.

FLUX's VAE latents are normalised as `(z - shift_factor) * scaling_factor`, and the transformer
sees them packed: each 2x2 block of latent positions becomes one token of 4C features, ordered
(channel, row in block, column in block), as `FluxPipeline._pack_latents` does.

Patch weights are per latent position, before the packing, not per packed token. The quality maps
live on the VAE's latent grid (one value per 8x8 image patch, as for SDXL), and per-position
weights keep that resolution, where one weight per token would average four positions into a
16x16-pixel grid. The loss is a weighted mean over every latent element, so it is the same whether
it is taken on the unpacked prediction (what diffusers' FLUX scripts do, and what the existing
`(2B, 1, h, w)` weights of the patch-level loss need) or on the packed tokens with
`pack_patch_weights`, which carries each position's weight to that position's C features in its
token: packing is a permutation of the elements, applied alike to prediction, target and weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL, FluxPipeline


def normalize_latents(latents: torch.Tensor, shift_factor: float, scaling_factor: float) -> torch.Tensor:
    return (latents - shift_factor) * scaling_factor


def denormalize_latents(latents: torch.Tensor, shift_factor: float, scaling_factor: float) -> torch.Tensor:
    """What `FluxPipeline` decodes: the inverse of `normalize_latents`."""
    return latents / scaling_factor + shift_factor


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """Float32 normalised posterior-mean latents of (N, 3, H, W) pixels in [-1, 1] (the VAE runs in its own dtype)."""
    mean = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean.float()
    return normalize_latents(mean, vae.config.shift_factor, vae.config.scaling_factor)


def vae_stride(block_out_channels: Sequence[int]) -> int:
    """Image pixels per latent position of a VAE with these blocks (8 for FLUX's four)."""
    return 2 ** (len(block_out_channels) - 1)


def _check_even(height: int, width: int) -> None:
    if height % 2 or width % 2:
        raise ValueError(f"FLUX packs 2x2 latent blocks: the latent grid must have even sides, got {height}x{width}")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, (h/2)(w/2), 4C) tokens, row-major over the 2x2 blocks."""
    batch, channels, height, width = latents.shape
    _check_even(height, width)
    blocks = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return blocks.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, (h/2)(w/2), 4C) -> (N, C, h, w) for a latent grid of `height` x `width` (the inverse of `pack_latents`)."""
    _check_even(height, width)
    batch, count, features = tokens.shape
    if count != (height // 2) * (width // 2) or features % 4:
        raise ValueError(f"{count} tokens of {features} features do not pack a {height}x{width} latent grid")
    blocks = tokens.view(batch, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return blocks.reshape(batch, features // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """((h/2)(w/2), 3) position ids of the packed tokens of a `height` x `width` latent grid, as the pipeline makes them."""
    _check_even(height, width)
    return FluxPipeline._prepare_latent_image_ids(None, height // 2, width // 2, device, dtype)


def pack_patch_weights(weights: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, 1, h, w) per-position weights -> (N, (h/2)(w/2), 4C), each position's weight on its own features of its token."""
    if weights.ndim != 4 or weights.shape[1] != 1:
        raise ValueError(f"expected (N, 1, h, w) per-position weights, got shape {tuple(weights.shape)}")
    return pack_latents(weights.expand(-1, channels, -1, -1).contiguous())
