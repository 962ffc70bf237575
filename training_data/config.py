"""The typed settings of `python -m training_data.construct`, built once from its flags (`training_data.cli`).

Each field is named after the flag it comes from, so an error about a setting can name the flag to
change. Nothing here imports torch: the parser builds it before the libraries load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ConstructConfig:
    """The models, the DATA folder, the sample plan (how many, which objects, which prompts) and the sampling."""

    base_model_path: Path
    image_encoder_path: Path
    ip_ckpt: Path
    dtype: str | None
    output_dir: Path
    compile: bool
    allow_tf32: bool
    ddp_timeout: float
    num_samples: int | None
    reference_images: Path | None
    num_generated: int
    categories: Path | None
    reference_template: str
    negative_prompt: str
    scale: float
    num_inference_steps: int | None  # None: the family's (`base_models.generation.with_model_defaults`)
    guidance_scale: float | None
    height: int | None  # None: the base model's native size (`base_models.generation.with_model_defaults`)
    width: int | None
    seed: int
    batch_size: int
