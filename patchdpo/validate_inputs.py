"""Every training input checked in one pass before the first step.

Images are otherwise decoded lazily by the data loader and quality maps read on demand, so a
corrupt PNG failed mid-run (after checkpoints were written) and a NaN or out-of-range map silently
turned the loss and then every checkpoint into NaN. Here each image is decoded once and each map
is checked to be finite and within its range; the first problem is one line naming the file, the
sample and the key.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common.checks import require_flags_in_range
from common.errors import BadInputError
from common.images import load_rgb_image
from common.outputs import check_output_dir
from patch_quality.store import GENERATED_SUFFIX, REFERENCE_SUFFIX, QualityMaps

from .pair_dataset import TrainingPair


def check_training_args(args: argparse.Namespace) -> None:
    """train_patchdpo.py's numeric flags in range and its output folders writable, before anything loads."""
    require_flags_in_range(args, ("resolution", "num_train_epochs"), minimum=1)
    require_flags_in_range(args, ("dataloader_num_workers", "learning_rate", "weight_decay", "dpo_beta", "noise_offset"), minimum=0)
    require_flags_in_range(args, ("image_drop_rate", "text_drop_rate", "both_drop_rate"), minimum=0, maximum=1)
    check_output_dir(args.output_dir)
    if args.cache_dir is not None:
        check_output_dir(args.cache_dir, "--cache_dir")


def map_ranges(quality_maps: QualityMaps) -> dict[str, tuple[float, float]]:
    """Allowed values per role: qualities lie in [0, 1]; `--signed` generated maps (metadata signed=true) in [-1, 1]."""
    signed = quality_maps.metadata.get("signed") == "true"
    return {REFERENCE_SUFFIX: (0.0, 1.0), GENERATED_SUFFIX: (-1.0, 1.0) if signed else (0.0, 1.0)}


def check_quality_map(quality_map: torch.Tensor, bounds: tuple[float, float], where: str) -> None:
    """`quality_map` is finite and within `bounds`; `where` names file, sample and key in the error."""
    finite = torch.isfinite(quality_map)
    if not finite.all():
        raise BadInputError(f"{where} holds {int((~finite).sum())} NaN/inf value(s)")
    low, high = quality_map.min().item(), quality_map.max().item()
    if low < bounds[0] or high > bounds[1]:
        raise BadInputError(f"{where} has values in [{low:g}, {high:g}], expected [{bounds[0]:g}, {bounds[1]:g}]")


def validate_training_inputs(pairs: Sequence[TrainingPair], quality_maps: QualityMaps | None, show_progress: bool = True) -> None:
    """Decode every image of `pairs` and check every quality map they use (a progress bar for large folders)."""
    ranges = map_ranges(quality_maps) if quality_maps is not None else {}
    decoded: set[Path] = set()
    for pair in tqdm(pairs, desc="checking training inputs", unit="pair", disable=not show_progress):
        for path in (pair.reference_path, pair.generated_path):
            if path not in decoded:
                load_rgb_image(path)
                decoded.add(path)
        if quality_maps is not None:
            for role, quality_map in zip((REFERENCE_SUFFIX, GENERATED_SUFFIX), quality_maps.get(pair.sample, pair.k)):
                where = f"{quality_maps.path}: sample {pair.sample!r} k={pair.k} key '{pair.sample}/{pair.k}/{role}'"
                check_quality_map(quality_map, ranges[role], where)
