"""The command lines of `python -m patch_quality.{maps,visualize,ssl_train}`, built without torch.

Those modules are library code as well as scripts, so they import torch, accelerate and the models at
their top. Run as scripts, they parse their flags with these parsers before those imports, so `--help`
(and a mistyped flag) answers at once; the libraries load only for a real run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import ArgumentParser, str2bool
from common.flags import add_ddp_timeout_arg

TRANSFORMS = ("raw", "minmax", "threshold")
FINETUNED_NAME = "ssl_backbone.safetensors"


def maps_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m patch_quality.maps",
        description="Estimate patch-quality maps for DATA/sample*/ and write DATA/patch_quality.safetensors.",
    )
    parser.add_argument("--data_root", type=Path, required=True, help="folder of sample{i}/ pairs (training_data.construct layout)")
    parser.add_argument(
        "--backbone",
        type=Path,
        required=True,
        help="DINOv2 / DINO (ViT) / CLIP-vision model: folder or Hugging Face id (e.g. facebook/dinov2-base)",
    )
    parser.add_argument("--finetuned", type=Path, default=None, help="patch_quality.ssl_train checkpoint applied on top of --backbone")
    parser.add_argument("--layer", type=int, default=-1, help="hidden_states index of the features (0 = embeddings, -1 = last block)")
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="backbone input edge (multiple of the patch size); default from the image processor config",
    )
    parser.add_argument(
        "--transform",
        choices=TRANSFORMS,
        default="raw",
        help="similarity -> weight: raw cosine clamped to [0,1], per-image min-max, or threshold",
    )
    parser.add_argument(
        "--good_threshold", type=float, default=0.5, help="cosine at or above which a patch counts as good (--transform threshold)"
    )
    parser.add_argument(
        "--signed", type=str2bool, default=False, help="map generated-image weights from [0,1] to [-1,1] so bad patches are pushed away"
    )
    parser.add_argument(
        "--foreground_mask",
        type=str2bool,
        default=True,
        help="restrict reference patches to the foreground of the clean-background reference",
    )
    parser.add_argument("--background_level", type=int, default=240, help="pixels with all channels >= this are reference background")
    parser.add_argument(
        "--foreground_fraction", type=float, default=0.05, help="fraction of foreground pixels that makes a patch foreground"
    )
    parser.add_argument(
        "--mask_reference_background", type=str2bool, default=True, help="set reference_map to 1 (weight 0) on the reference background"
    )
    parser.add_argument("--resolution", type=int, default=512, help="training resolution")
    parser.add_argument(
        "--base_model_path",
        default=None,
        help="SDXL model training uses (folder or Hugging Face id): maps are resolution / its VAE factor square",
    )
    parser.add_argument(
        "--vae_scale_factor", type=int, default=None, help="VAE downsampling factor; checked against --base_model_path, or used alone"
    )
    parser.add_argument("--output", type=Path, default=None, help="default: DATA_ROOT/patch_quality.safetensors")
    parser.add_argument("--batch_size", type=int, default=8, help="samples per backbone forward pass")
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="backbone dtype (similarities are computed in float32)",
    )
    parser.add_argument("--cpu", action="store_true", help="run on CPU even if an accelerator is available")
    add_ddp_timeout_arg(parser)
    return parser


def visualize_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m patch_quality.visualize",
        description="Overlay quality maps on their images (PNG strips).",
    )
    parser.add_argument("--data_root", type=Path, required=True, help="folder of sample{i}/ pairs")
    parser.add_argument("--output_dir", type=Path, required=True, help="where {sample}_gen_{k}.png strips go")
    parser.add_argument("--maps", type=Path, default=None, help="quality-map file; default DATA_ROOT/patch_quality.safetensors")
    parser.add_argument("--max_samples", type=int, default=None, help="only the first N samples (by index)")
    parser.add_argument("--size", type=int, default=256, help="edge of each tile in pixels")
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the coloured map")
    parser.add_argument("--overwrite", type=str2bool, default=False, help="redraw panels that already exist")
    return parser


def ssl_train_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m patch_quality.ssl_train",
        description="Patch-correspondence self-supervised finetuning of a ViT backbone.",
    )
    parser.add_argument(
        "--backbone",
        type=Path,
        required=True,
        help="DINOv2 / DINO (ViT) / CLIP-vision model: folder or Hugging Face id (e.g. facebook/dinov2-base)",
    )
    parser.add_argument(
        "--train_data", type=Path, required=True, help="folder searched recursively for images (e.g. DATA from training_data.construct)"
    )
    parser.add_argument("--output_dir", type=Path, required=True, help=f"gets {FINETUNED_NAME}, metrics.json, checkpoint-N/, logs/")
    parser.add_argument("--layer", type=int, default=-1, help="hidden_states index whose patch tokens are trained (use the same for maps)")
    parser.add_argument("--trainable_blocks", type=int, default=2, help="train the last N blocks up to --layer; everything else frozen")
    parser.add_argument(
        "--image_size", type=int, default=None, help="view edge fed to the backbone; default from the image processor config"
    )
    parser.add_argument("--source_size", type=int, default=None, help="edge images are loaded at before cropping (default 2 x image size)")
    parser.add_argument("--crop_scale", type=float, nargs=2, default=(0.35, 1.0), help="random resized crop area range")
    parser.add_argument("--crop_ratio", type=float, nargs=2, default=(3 / 4, 4 / 3), help="random resized crop aspect range")
    parser.add_argument("--flip_prob", type=float, default=0.5, help="horizontal-flip probability per view")
    parser.add_argument("--color_jitter", type=float, default=0.4, help="brightness/contrast/saturation factors drawn from [1-x, 1+x]")
    parser.add_argument("--temperature", type=float, default=0.1, help="InfoNCE temperature")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--train_batch_size", type=int, default=16, help="images per process (two views each)")
    parser.add_argument("--max_train_steps", type=int, default=2000)
    parser.add_argument("--validation_fraction", type=float, default=0.1, help="images held out for the matching accuracy")
    parser.add_argument("--validation_pairs_per_image", type=int, default=2)
    parser.add_argument("--validation_steps", type=int, default=200, help="log held-out accuracy every N steps (0: only before/after)")
    parser.add_argument("--checkpointing_steps", type=int, default=None, help="save a resumable state every N steps")
    parser.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-N folder")
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None)
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--report_to", default="tensorboard")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cpu", action="store_true", help="train on CPU even if an accelerator is available")
    return parser
