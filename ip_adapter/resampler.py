"""Perceiver resampler of IP-Adapter-Plus: CLIP patch features -> a few image tokens.

The module tree mirrors the public `ip-adapter-plus_sdxl_vit-h.bin` "image_proj" section key for
key (`latents`, `proj_in`, `layers.{i}.0.{norm1,norm2,to_q,to_kv,to_out}`,
`layers.{i}.1.{0,1,3}`, `proj_out`, `norm_out`), so released IP-Adapter-Plus and PatchDPO weights
load with `strict=True` and ours load in diffusers' `IPAdapterPlusImageProjection`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import BadInputError

from .checkpoint import load_strict, naming_file

#: Head width used by every published IP-Adapter-Plus resampler; diffusers hard-codes it too when
#: it infers the head count from a checkpoint.
DIM_HEAD = 64


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    # Indices 0, 1, 3 carry weights; index 2 (GELU) has none: this is the checkpoint layout.
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latent queries attend over [image features; latents] (the latents also see themselves)."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        inner_dim = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, -1).transpose(1, 2)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features = self.norm1(features)
        latents = self.norm2(latents)
        query = self._split_heads(self.to_q(latents))
        key, value = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(query, self._split_heads(key), self._split_heads(value))
        batch, _, length, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(batch, length, -1))


class Resampler(nn.Module):
    """Maps (B, L, embedding_dim) CLIP hidden states to (B, num_queries, output_dim) tokens."""

    def __init__(
        self,
        dim: int = 1280,
        depth: int = 4,
        dim_head: int = DIM_HEAD,
        heads: int = 20,
        num_queries: int = 16,
        embedding_dim: int = 1280,
        output_dim: int = 2048,
        ff_mult: int = 4,
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)]) for _ in range(depth)
        )

    @property
    def num_queries(self) -> int:
        return self.latents.shape[1]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(features.shape[0], -1, -1)
        features = self.proj_in(features)
        for attention, feed_forward in self.layers:
            latents = attention(features, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))

    @staticmethod
    def config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Read the architecture off a checkpoint's "image_proj" tensors (as diffusers does)."""
        required = ("latents", "proj_in.weight", "proj_out.weight", "layers.0.0.to_q.weight", "layers.0.1.1.weight")
        missing = [key for key in required if key not in state_dict]
        if missing:
            raise BadInputError(f"image_proj state dict lacks {missing[0]!r}: not an IP-Adapter-Plus resampler")
        _, num_queries, dim = state_dict["latents"].shape
        depth = 1 + max(int(key.split(".")[1]) for key in state_dict if key.startswith("layers."))
        return dict(
            dim=dim,
            depth=depth,
            dim_head=DIM_HEAD,
            heads=state_dict["layers.0.0.to_q.weight"].shape[0] // DIM_HEAD,
            num_queries=num_queries,
            embedding_dim=state_dict["proj_in.weight"].shape[1],
            output_dim=state_dict["proj_out.weight"].shape[0],
            ff_mult=state_dict["layers.0.1.1.weight"].shape[0] // dim,
        )

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], source: str | os.PathLike | None = None) -> Resampler:
        """Build a resampler shaped like `state_dict` and load it strictly; errors name `source`, the file it came from."""
        with naming_file(source):
            model = cls(**cls.config_from_state_dict(state_dict))
        load_strict(model, state_dict, "image_proj", source)
        return model
