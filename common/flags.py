"""Flag groups shared by several scripts, defined without importing torch, diffusers or transformers.

`--help` must answer at once, so the parsers are built from this module alone; the libraries are
imported only once the arguments are parsed. The code these flags configure lives in
`ip_adapter.loading` (generator), `dreambench.evaluation` (metrics), `dreambench.validation`
(validation during training) and `patchdpo.method` (objectives).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common.cli import str2bool

DTYPE_NAMES = ("bfloat16", "float16", "float32")
LOSS_MODES = ("patch_dpo", "mse", "image_dpo")
#: The timestep densities of diffusers' `--weighting_scheme` (`compute_density_for_timestep_sampling`).
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")
#: FLUX's flow-matching flags and their defaults: those of diffusers' examples/dreambooth/train_dreambooth_flux.py.
FLOW_MATCHING_DEFAULTS = {"weighting_scheme": "none", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29, "guidance_scale": 3.5}
#: diffusers' `get_scheduler` names (`diffusers.optimization.SchedulerType`; a test keeps them in sync).
#: Optimizer settings a training resume may change deliberately (`--change_on_resume`, `patchdpo.run_settings`).
CHANGEABLE_ON_RESUME = ("learning_rate", "weight_decay", "lr_scheduler", "lr_warmup_steps", "max_grad_norm")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)
DEFAULT_VALIDATION_SUBJECTS = ("dog", "backpack")
#: the negative prompt of IP-Adapter's SDXL demo (`ip_adapter.ip_adapter` uses it, construct's flag defaults to it).
DEFAULT_NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"


def add_generator_args(parser: argparse.ArgumentParser, base_model_help: str, ip_ckpt_help: str) -> None:
    """The model flags of every script that generates with a base model + IP-Adapter-Plus."""
    parser.add_argument("--base_model_path", type=Path, required=True, help=base_model_help)
    parser.add_argument(
        "--image_encoder_path",
        type=Path,
        required=True,
        help="the adapter's CLIP vision encoder: folder or Hugging Face id (ViT-H h94/IP-Adapter/models/image_encoder for SDXL and SD 1.5; ViT-L/14 openai/clip-vit-large-patch14 for FLUX.1)",
    )
    parser.add_argument("--ip_ckpt", type=Path, required=True, help=ip_ckpt_help)
    parser.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default=None,
        help="model dtype (default: accelerate's mixed precision on GPU, float32 on CPU)",
    )


PAPER_CLIP_MODEL = "ViT-B/32"  # CLIP-I and CLIP-T, as the paper and DreamBench compute them
PAPER_DINO_MODEL = "facebook/dino-vits16"  # DINO


def add_metric_model_args(group: argparse._ArgumentGroup, optional_use: str | None = None) -> None:
    """`--clip_model`/`--dino_model`, the paper's by default; with `optional_use`, scoring happens only when one is given."""
    when = "" if optional_use is None else f"give either to {optional_use}; "
    default = None if optional_use is not None else PAPER_CLIP_MODEL
    group.add_argument(
        "--clip_model",
        default=default,
        help=f"{when}openai-clip name (fetched as clip.load does, ~/.cache/clip) or local .pt file (default: {PAPER_CLIP_MODEL})",
    )
    group.add_argument(
        "--dino_model",
        default=None if optional_use is not None else PAPER_DINO_MODEL,
        help=f"{when}DINO ViT-S/16: folder or Hugging Face id (default: {PAPER_DINO_MODEL})",
    )


def metric_models(clip_model: str | None, dino_model: str | None) -> tuple[str | None, str | None]:
    """Optional scoring (`add_metric_model_args(optional_use=...)`) is on when either model is given; the other is then the paper's."""
    if clip_model is None and dino_model is None:
        return None, None
    return clip_model or PAPER_CLIP_MODEL, dino_model or PAPER_DINO_MODEL


def add_evaluation_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The metric flags of evaluate_dreambooth.py."""
    group = parser.add_argument_group("DreamBench metrics")
    add_metric_model_args(group)
    group.add_argument("--batch_size", type=int, default=25, help="images per metric-model forward pass")
    group.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    group.add_argument(
        "--allow_partial",
        type=str2bool,
        nargs="?",
        const=True,
        default=False,
        help="score what exists and report missing subjects/images instead of failing",
    )
    return parser


def add_validation_args(parser: argparse.ArgumentParser) -> None:
    """Validation during training (`dreambench.validation`)."""
    group = parser.add_argument_group("validation during training (on when --validation_data_root is given)")
    group.add_argument("--validation_data_root", type=Path, default=None, help="DreamBench folder (dataset/, json_data/)")
    group.add_argument("--validation_steps", type=int, default=None, help="validate every N steps (default: with every --save_steps)")
    group.add_argument(
        "--validation_subjects", nargs="+", default=list(DEFAULT_VALIDATION_SUBJECTS), help="DreamBench subjects to generate"
    )
    group.add_argument("--validation_prompts", type=int, default=2, help="first N DreamBench prompts per subject")
    group.add_argument("--validation_num_inference_steps", type=int, default=30)
    group.add_argument("--validation_scale", type=float, default=0.78, help="IP-Adapter scale of the validation images")
    group.add_argument("--validation_size", type=int, default=None, help="image edge (default: --resolution)")
    add_metric_model_args(group, optional_use="score the validation images")


def add_sampling_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The sampling flags of every script that generates: steps, guidance (the paper's values) and image size."""
    parser.add_argument(
        "--num_inference_steps",
        type=int,
        default=None,
        help="default: 30 for SDXL and SD 1.5 (the paper's), 28 for FLUX.1 (FluxPipeline's)",
    )
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="default: classifier-free guidance 5.0 for SDXL and SD 1.5 (the paper's); FLUX.1: embedded guidance 3.5 (FluxPipeline's)",
    )
    native = "default: the base model's native size (1024 for SDXL and FLUX.1, 512 for SD 1.5)"
    parser.add_argument("--height", type=int, default=None, help=native)
    parser.add_argument("--width", type=int, default=None, help=native)


def sampling_settings(config: object) -> dict[str, Any]:
    """The values of `add_sampling_args`' flags in a script's typed config, named as the pipelines' keyword arguments."""
    return {name: getattr(config, name) for name in ("num_inference_steps", "guidance_scale", "height", "width")}


def add_speed_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--compile` and `--allow_tf32`, the speed flags of every script that runs the UNet in a loop."""
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet (no graph breaks; compiles once per input shape, time printed once)",
    )
    parser.add_argument("--allow_tf32", action="store_true", help="TF32 float32 matmuls on CUDA (faster; float32 results change slightly)")


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 1, got {text}")
    return value


def add_ddp_timeout_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--ddp_timeout`: how long a process waits in a collective for the others (a dead or stalled one) before failing."""
    parser.add_argument(
        "--ddp_timeout",
        type=_seconds,
        default=1800,
        help="seconds a process waits for the others in a collective before the run fails (process-group timeout)",
    )


def add_flow_matching_args(parser: argparse.ArgumentParser) -> None:
    """FLUX's timestep density, loss weighting and guidance value (`base_models.flow_matching`); unset for a UNet model."""
    group = parser.add_argument_group(
        "FLUX (flow matching); defaults: diffusers' examples/dreambooth/train_dreambooth_flux.py, refused for SDXL / SD 1.5"
    )
    d = FLOW_MATCHING_DEFAULTS
    group.add_argument(
        "--weighting_scheme",
        choices=WEIGHTING_SCHEMES,
        default=None,
        help=f"timestep density and loss weight (default {d['weighting_scheme']}: uniform timesteps, unit weights)",
    )
    group.add_argument("--logit_mean", type=float, default=None, help=f"logit_normal's mean (default {d['logit_mean']})")
    group.add_argument("--logit_std", type=float, default=None, help=f"logit_normal's std, > 0 (default {d['logit_std']})")
    group.add_argument("--mode_scale", type=float, default=None, help=f"the mode scheme's scale (default {d['mode_scale']})")
    group.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help=f"guidance value fed to a guidance-distilled transformer (FLUX.1-dev) in training (default {d['guidance_scale']})",
    )
