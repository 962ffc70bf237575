"""The typed settings of inference_dreambooth.py, generate.py and evaluate_dreambooth.py (and of validation during training), built once from their flags.

Each field is named after the flag it comes from, in the parser's order (`common.cli.parse_config`
checks both): an error about a setting names the flag to change, and `run_config.json` records the
settings in the order it always has. Nothing here imports torch: the scripts build these before
the libraries load.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from common.flags import metric_models

DEFAULT_SCALES = {False: 0.78, True: 0.65}  # the README's settings: original / Kosmos-G


@dataclass(frozen=True)
class InferenceConfig:
    """inference_dreambooth.py: the generator, the benchmark setting, the sampling, and the optional scoring at the end."""

    base_model_path: Path
    image_encoder_path: Path
    ip_ckpt: Path
    dtype: str | None
    data_root: Path
    output_dir: Path
    scale: float | None
    is_kosmosg: bool
    num_inference_steps: int | None  # None: the family's (`base_models.generation.with_model_defaults`)
    guidance_scale: float | None
    height: int | None  # None: the base model's native size (`base_models.generation.with_model_defaults`)
    width: int | None
    seed: int
    batch_size: int
    subjects: list[str] | None
    compile: bool
    allow_tf32: bool
    ddp_timeout: float
    prompts_per_subject: int | None
    clip_model: str | None
    dino_model: str | None

    def with_defaults(self) -> InferenceConfig:
        """The setting's scale when --scale is unset; both metric models (the paper's for the missing one) when either is given."""
        clip_model, dino_model = metric_models(self.clip_model, self.dino_model)
        scale = DEFAULT_SCALES[self.is_kosmosg] if self.scale is None else self.scale
        return replace(self, scale=scale, clip_model=clip_model, dino_model=dino_model)

    @property
    def scoring(self) -> bool:
        return self.clip_model is not None or self.dino_model is not None


@dataclass(frozen=True)
class GenerateConfig:
    """generate.py: the generator and its checkpoints, your photos and prompts, the sampling, and the optional scores."""

    base_model_path: Path
    image_encoder_path: Path
    ip_ckpt: list[Path]
    dtype: str | None
    reference_images: list[str]
    boxes: Path | None
    prompts: list[str]
    prompts_file: Path | None
    num_images: int
    seed: int
    scale: float
    num_inference_steps: int | None  # None: the family's (`base_models.generation.with_model_defaults`)
    guidance_scale: float | None
    height: int | None  # None: the base model's native size (`base_models.generation.with_model_defaults`)
    width: int | None
    batch_size: int
    output_dir: Path
    compile: bool
    allow_tf32: bool
    ddp_timeout: float
    clip_model: str | None
    dino_model: str | None

    @property
    def scoring(self) -> bool:
        return self.clip_model is not None or self.dino_model is not None


@dataclass(frozen=True)
class EvaluateConfig:
    """evaluate_dreambooth.py: which generations to score against which DreamBench photos, with which metric models."""

    output_dir: str
    data_root: str
    is_kosmosg: bool | None
    subjects: list[str] | None
    clip_model: str
    dino_model: str
    batch_size: int
    device: str | None
    allow_partial: bool


@dataclass(frozen=True)
class ValidationSettings:
    """Validation during training (`dreambench.validation`): train_patchdpo.py's --validation_* flags, resolved."""

    data_root: Path
    every: int  # optimizer steps between validations
    subjects: list[str]
    prompts_per_subject: int
    num_inference_steps: int
    scale: float
    size: int  # image edge in pixels
    clip_model: str | None  # None (both): no scores
    dino_model: str | None
