"""The command line of `python -m training_data.construct`, built without torch.

`training_data.construct` is library code as well as a script, so it imports torch, accelerate and
the models at its top. Run as a script, it parses its flags with this parser before those imports,
so `--help` (and a mistyped flag) answers at once; the libraries load only for a real run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import ArgumentParser
from common.flags import DEFAULT_NEGATIVE_PROMPT, add_ddp_timeout_arg, add_generator_args, add_sampling_args, add_speed_args
from training_data.categories import REFERENCE_TEMPLATE


def construct_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m training_data.construct",
        description="Build PatchDPO training pairs (references + IP-Adapter-Plus generations).",
    )
    add_generator_args(
        parser,
        "SDXL pipeline (references and the generator's base): folder or Hugging Face id (e.g. SG161222/RealVisXL_V1.0)",
        "IP-Adapter-Plus checkpoint to generate with: .bin/.safetensors file or REPO_ID/path/in/repo.bin",
    )
    parser.add_argument("--output_dir", type=Path, required=True, help="DATA folder to create or resume")
    add_speed_args(parser)  # applied to the generator (the UNet with the adapter installed)
    add_ddp_timeout_arg(parser)
    parser.add_argument("--num_samples", type=int, default=None, help="number of sample{i}/ folders (required unless --reference_images)")
    parser.add_argument(
        "--reference_images",
        type=Path,
        default=None,
        help='JSON list of {"image": path, "category": word}: use these images as the references (one sample each) instead of drawing them',
    )
    parser.add_argument("--num_generated", type=int, default=1, help="generated images per reference (K); training uses gen_0 by default")
    parser.add_argument("--categories", type=Path, default=None, help="text file, one object category per line (default: the shipped list)")
    parser.add_argument(
        "--reference_template", default=REFERENCE_TEMPLATE, help="reference prompt; {object} is the category with its article"
    )
    parser.add_argument("--negative_prompt", default=DEFAULT_NEGATIVE_PROMPT, help="negative prompt of the reference images")
    parser.add_argument("--scale", type=float, default=0.78, help="IP-Adapter scale of the generated images (the inference setting)")
    add_sampling_args(parser)
    parser.add_argument("--seed", type=int, default=42, help="base seed; every image's seed is sha256-derived from (seed, role, sample, k)")
    parser.add_argument("--batch_size", type=int, default=4, help="images per denoising batch (does not change the images)")
    return parser
