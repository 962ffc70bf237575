"""Tiny random stand-ins for the DreamBench metric models, saved in their real on-disk formats.

Used by the tests and by the offline demo, where no CLIP or DINO weights can be downloaded.

- `save_tiny_clip_archive`: an OpenAI-CLIP TorchScript archive (what `clip.load(path, jit=False)` reads: it
  `torch.jit.load`s the file and rebuilds the architecture from the state-dict shapes, with
  heads = width // 64, so the widths are 64 and the vocabulary/context are the real 49408/77 that
  `clip.tokenize` produces).
- `save_tiny_dino`: a `transformers.ViTModel` with 16-pixel patches at 224, saved with
  `save_pretrained` like facebook/dino-vits16, without a pooler.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
from transformers import ViTConfig, ViTModel

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    import clip
    from clip.model import CLIP

__all__ = ["save_tiny_clip_archive", "save_tiny_dino"]


def save_tiny_clip_archive(path: Path, seed: int = 0) -> Path:
    """Saved from one trace per seed and process: TorchScript renames the classes of a second trace
    (`___torch_mangle_N`), so re-tracing gave a rebuilt stand-in other bytes than the first."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(_traced_tiny_clip(seed), str(path))
    return path


@functools.cache
def _traced_tiny_clip(seed: int) -> torch.jit.ScriptModule:
    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=32,
        image_resolution=224,
        vision_layers=1,
        vision_width=64,
        vision_patch_size=32,
        context_length=77,
        vocab_size=49408,
        transformer_width=64,
        transformer_heads=1,
        transformer_layers=1,
    ).eval()
    example = (torch.randn(1, 3, 224, 224), clip.tokenize(["a photo"]))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(model, example, check_trace=False)


def save_tiny_dino(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=224,
        patch_size=16,
        qkv_bias=True,
        layer_norm_eps=1e-6,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    return path
