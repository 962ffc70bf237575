"""The benchmark scripts' command lines, built without torch so that `--help` answers at once.

The scripts parse with these parsers before they import torch, diffusers and the models. Defaults
that depend on the machine (is there a CUDA device?) are therefore left unset here and filled in by
each script once torch is loaded; the help says what they become. The name tuples mirror
`stand_ins.sdxl.SHAPES` and `gpu_check.SIZES` (tests/test_benchmarks.py keeps them in sync).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import ArgumentParser
from dreambench.benchmark import SUBJECT_NAMES

REPO = Path(__file__).resolve().parents[1]
SHAPE_NAMES = ("full", "mid", "tiny")  # stand_ins.sdxl.SHAPES and stand_ins.flux.SHAPES
BASE_MODELS = ("sdxl", "flux")
SIZE_NAMES = ("full", "mid", "tiny")  # gpu_check.SIZES
VARIANTS = ("reference", "ours_no_cache", "ours")
RESULTS_MD = REPO / "benchmarks" / "RESULTS.md"


def train_parser(description: str) -> argparse.ArgumentParser:
    parser = ArgumentParser(description=description)
    parser.add_argument("--base_model", choices=BASE_MODELS, default="sdxl", help="random-weight stand-ins of SDXL or FLUX.1-dev")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--shape", choices=SHAPE_NAMES, default=None, help="default: full on cuda, mid on cpu")
    parser.add_argument("--resolution", type=int, default=None, help="default: 512 on cuda, 128 on cpu")
    parser.add_argument("--batch_size", type=int, default=None, help="pairs per step; default: 4 on cuda, 2 on cpu")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="default: fp16 on cuda, no on cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (>= 1: the first one checks the losses agree)")
    parser.add_argument("--num_workers", type=int, default=None, help="data loader workers; default: 4 on cuda, 0 on cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each CPU run")
    parser.add_argument("--compile", action="store_true", help="ours: torch.compile the UNet, as train_patchdpo.py --compile")
    parser.add_argument("--compile_backend", default="inductor", help=argparse.SUPPRESS)
    parser.add_argument("--count_flops", action="store_true", help="count the FLOPs of one step (torch.utils.flop_counter)")
    parser.add_argument("--work_dir", default=None, help="models, data and cache go here (default: a temporary folder)")
    parser.add_argument("--variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--models", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    return parser


def inference_parser(description: str) -> argparse.ArgumentParser:
    parser = ArgumentParser(description=description)
    parser.add_argument("--base_model", choices=BASE_MODELS, default="sdxl", help="random-weight stand-ins of SDXL or FLUX.1-dev")
    parser.add_argument("--shape", choices=SHAPE_NAMES, default=None, help="default: full on cuda, mid on cpu")
    parser.add_argument("--size", type=int, default=None, help="image edge in pixels; default: 1024 on cuda, 128 on cpu")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="default: 30 on cuda, 10 on cpu")
    parser.add_argument(
        "--dtype", choices=["float16", "bfloat16", "float32"], default=None, help="default: float16 on cuda, float32 on cpu"
    )
    parser.add_argument("--subjects", nargs="+", default=["backpack", "dog"], choices=SUBJECT_NAMES)
    parser.add_argument("--prompts_per_subject", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8, help="our path's images per denoising batch")
    parser.add_argument("--scale", type=float, default=0.78)
    parser.add_argument("--data_root", type=Path, default=REPO.parent / "shared" / "dreambench")
    parser.add_argument("--tolerance", type=int, default=2, help="allowed max pixel difference (of 255) where seeds agree")
    parser.add_argument("--output", type=Path, default=None, help="also write the numbers as JSON here")
    return parser


def gpu_check_parser(description: str) -> argparse.ArgumentParser:
    parser = ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json")
    parser.add_argument("--size", choices=SIZE_NAMES, default="full")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--precisions", nargs="+", default=None, choices=["fp16", "bf16", "no"], help="default: fp16 bf16 on cuda, no on cpu"
    )
    parser.add_argument("--compile_backend", default=None, help="default: inductor on cuda, eager on cpu (see the module docstring)")
    parser.add_argument(
        "--budget_s",
        type=float,
        default=None,
        help="the whole run's time limit (default: 480 s full; tiny: 600 s, a cap for loaded machines)",
    )
    parser.add_argument("--stages", nargs="+", default=None, help="run only these stages (models always runs)")
    parser.add_argument("--work_dir", type=Path, default=None, help="models and pairs, kept for the next run (default: in the temp folder)")
    parser.add_argument("--write-results", dest="write_results", action="store_true", help="then fill RESULTS.md's GPU section")
    parser.add_argument("--no-run", dest="no_run", action="store_true", help="with --write-results: use the existing results.json")
    parser.add_argument("--results_md", type=Path, default=RESULTS_MD, help=argparse.SUPPRESS)
    return parser
