"""The typed settings of `python -m patch_quality.{maps,visualize,ssl_train,convert_pkl}`, built once from their flags.

Each field is named after the flag it comes from (`patch_quality.cli` builds these with
`common.cli.parse_config`), so an error about a setting can name the flag to change. Nothing here
imports torch: the parsers build them before the libraries load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MapsConfig:
    """`python -m patch_quality.maps`: which backbone scores which DATA, how similarities become weights, on which grid."""

    data_root: Path
    backbone: Path
    finetuned: Path | None
    layer: int
    image_size: int | None
    transform: str
    good_threshold: float
    signed: bool
    foreground_mask: bool
    background_level: int
    foreground_fraction: float
    mask_reference_background: bool
    resolution: int
    base_model_path: str | None
    vae_scale_factor: int | None
    output: Path | None
    batch_size: int
    dtype: str
    cpu: bool
    ddp_timeout: float


@dataclass(frozen=True)
class VisualizeConfig:
    """`python -m patch_quality.visualize`: which maps to draw over which images, and how."""

    data_root: Path
    output_dir: Path
    maps: Path | None
    max_samples: int | None
    size: int
    alpha: float
    overwrite: bool


@dataclass(frozen=True)
class SslTrainConfig:
    """`python -m patch_quality.ssl_train`: the backbone, its images, the augmentations and the optimisation."""

    backbone: Path
    train_data: Path
    output_dir: Path
    layer: int
    trainable_blocks: int
    image_size: int | None
    source_size: int | None
    crop_scale: Sequence[float]
    crop_ratio: Sequence[float]
    flip_prob: float
    color_jitter: float
    temperature: float
    learning_rate: float
    weight_decay: float
    train_batch_size: int
    max_train_steps: int
    validation_fraction: float
    validation_pairs_per_image: int
    validation_steps: int
    checkpointing_steps: int | None
    resume_from_checkpoint: str | None
    mixed_precision: str | None
    dataloader_num_workers: int
    report_to: str
    seed: int
    cpu: bool


@dataclass(frozen=True)
class ConvertConfig:
    """`python -m patch_quality.convert_pkl`: the official pickle, the file to write, the DATA it describes."""

    input: Path
    output: Path
    data_root: Path
