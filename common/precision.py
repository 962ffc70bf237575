"""The weight dtype of accelerate's `--mixed_precision` setting, defined once for training and generation."""

from __future__ import annotations

import torch

MIXED_PRECISION_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def mixed_precision_dtype(mixed_precision: str) -> torch.dtype:
    """float16 for "fp16", bfloat16 for "bf16", float32 for anything else ("no", None)."""
    return MIXED_PRECISION_DTYPES.get(mixed_precision, torch.float32)
