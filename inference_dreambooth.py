"""Generate the DreamBench images (30 subjects x 25 prompts) with SDXL or SD 1.5 + IP-Adapter-Plus.

    accelerate launch --num_processes 2 --multi_gpu --mixed_precision fp16 inference_dreambooth.py \
        --base_model_path SDXL_DIR --image_encoder_path ENC_DIR --ip_ckpt model.bin \
        --data_root ../shared/dreambench --output_dir out/ --scale 0.78 --is_kosmosg False

Writes `<output_dir>/<subject>/<prompt>.png`, `<output_dir>/grids/<subject>.png` and
`<output_dir>/run_config.json`. Work is split by image over the processes; each image has its own
seed, so the result does not depend on the number of processes or the batch size. Rerunning the same
command resumes: existing images are skipped. On a CPU-only machine, start several processes with
`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N inference_dreambooth.py ...`.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from common.checks import require_flags_in_range, require_sampling_args
from common.cli import ArgumentParser, str2bool
from common.flags import (
    add_ddp_timeout_arg,
    add_generator_args,
    add_metric_model_args,
    add_sampling_args,
    add_speed_args,
    sampling_settings,
    scoring_requested,
)

if TYPE_CHECKING:
    from accelerate import Accelerator
    from PIL import Image

DEFAULT_SCALES = {False: 0.78, True: 0.65}  # the README's settings: original / Kosmos-G


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_generator_args(
        parser,
        "SDXL or SD 1.5 pipeline: folder or Hugging Face id (e.g. SG161222/RealVisXL_V1.0)",
        "IP-Adapter-Plus / PatchDPO checkpoint: .bin/.safetensors file or REPO_ID/path/in/repo.bin",
    )
    parser.add_argument("--data_root", type=Path, required=True, help="DreamBench folder with dataset/ and json_data/")
    parser.add_argument("--output_dir", type=Path, required=True, help="gets <subject>/<prompt>.png, grids/, run_config.json")
    parser.add_argument(
        "--scale", type=float, default=None, help="IP-Adapter scale (default: 0.78 original setting, 0.65 Kosmos-G setting)"
    )
    parser.add_argument(
        "--is_kosmosg",
        type=str2bool,
        default=False,
        help="True: condition on the single Kosmos-G image per subject; False: average all references",
    )
    add_sampling_args(parser)
    parser.add_argument("--seed", type=int, default=42, help="base seed; each image's seed is derived from (seed, subject, prompt)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per denoising batch (does not change the images)")
    parser.add_argument("--subjects", nargs="+", default=None, help="subset of subjects (default: all 30)")
    add_speed_args(parser)
    add_ddp_timeout_arg(parser)
    parser.add_argument(
        "--prompts_per_subject",
        type=int,
        default=None,
        help="smoke tests only: generate the first N prompts of each subject (scores are then not comparable)",
    )
    scoring = parser.add_argument_group("scoring at the end (as evaluate_dreambooth.py)")
    add_metric_model_args(scoring, optional_use="score the run at the end")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Numbers, sizes and paths before any model loads (the metric models are loaded by `run`, on the main process)."""
    from base_models.generation import check_generator_paths, image_size
    from common.outputs import check_output_dir
    from dreambench.evaluation import check_scores_writable

    require_flags_in_range(args, ("batch_size", "prompts_per_subject"), minimum=1)
    args.height, args.width = image_size(args.height, args.width, args.base_model_path)
    require_sampling_args(args)
    require_flags_in_range(args, ("scale",), minimum=0)
    check_output_dir(args.output_dir)
    if scoring_requested(args):  # fail now rather than after hours of generation
        check_scores_writable(args.output_dir, args.is_kosmosg)
    check_generator_paths(args.base_model_path, args.image_encoder_path, args.ip_ckpt)


def run(args: argparse.Namespace, accelerator: Accelerator, held: contextlib.ExitStack) -> None:
    """Generate and score; the output folder is claimed into `held` once inputs and models are checked (released when it closes)."""
    # Imported here, not at the top: --help must not wait for torch and diffusers.
    from base_models.generation import load_generation_model
    from common.distributed import check_on_main
    from common.hub import resolve_file
    from common.io import sha256_file
    from common.launch import check_launch
    from dreambench.benchmark import prompts_for, resolve_subjects
    from dreambench.contact_sheet import GRIDS_DIR, write_contact_sheets
    from dreambench.data import check_boxes_inside_photos, load_conditioning_images, reference_photos
    from dreambench.evaluation import SCORE_FILE, format_score_table, score_generations, write_scores
    from dreambench.generation import build_items, generate_items, pending_items
    from dreambench.metrics import check_metric_models
    from dreambench.run_config import check_resumable, make_run_config, start_in_output_dir
    from ip_adapter.batch_generation import SubjectTokens
    from ip_adapter.loading import dtype_name, resolve_dtype
    from ip_adapter.speed import apply_speed_args

    check_launch(accelerator.num_processes, "inference_dreambooth.py")
    if args.scale is None:
        args.scale = DEFAULT_SCALES[args.is_kosmosg]
    check_args(args)
    check_on_main(accelerator, lambda: check_metric_models(args.clip_model, args.dino_model))  # loaded once: a bad one fails now
    subjects = [subject.name for subject in resolve_subjects(args.subjects)]
    for subject in subjects:  # a broken data root fails here, before any model is loaded
        check_boxes_inside_photos(reference_photos(args.data_root, subject, args.is_kosmosg))
    subject_prompts = {subject: prompts_for(subject)[: args.prompts_per_subject] for subject in subjects}

    def load_references(subject: str) -> list[Image.Image]:
        return load_conditioning_images(args.data_root, subject, args.is_kosmosg)

    dtype = resolve_dtype(args.dtype, accelerator.mixed_precision, accelerator.device)
    config = make_run_config(
        vars(args),
        ip_ckpt_sha256=sha256_file(resolve_file(args.ip_ckpt, "--ip_ckpt")),
        dtype=dtype_name(dtype),
        num_processes=accelerator.num_processes,
    )
    check_resumable(args.output_dir, config)  # every process checks, so all of them stop together
    items = build_items(subject_prompts, args.seed)
    pending = pending_items(items, args.output_dir)
    # Every process must list the same pending images (or the contiguous shards would overlap or
    # leave gaps), so nothing is written before all of them have listed.
    accelerator.wait_for_everyone()
    accelerator.print(
        f"{len(items) - len(pending)}/{len(items)} images exist, generating {len(pending)} on "
        f"{accelerator.num_processes} process(es) in {dtype_name(dtype)}, scale {args.scale}"
    )
    ip_model = None
    if pending:
        ip_model = load_generation_model(args.base_model_path, args.image_encoder_path, args.ip_ckpt, accelerator.device, dtype)
        apply_speed_args(args, ip_model.pipe.unet, accelerator.print)
    start_in_output_dir(accelerator, held, args.output_dir, [*subjects, GRIDS_DIR], config)

    if ip_model is not None:
        tokens = SubjectTokens(ip_model, load_references)
        with accelerator.split_between_processes(pending) as shard:
            generate_items(
                ip_model,
                tokens,
                shard,
                args.output_dir,
                args.batch_size,
                scale=args.scale,
                progress_position=accelerator.process_index,
                **sampling_settings(args),
            )
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        write_contact_sheets(args.output_dir, subject_prompts, load_references)
        accelerator.print(f"images in {args.output_dir.resolve()}, contact sheets in {(args.output_dir / GRIDS_DIR).resolve()}")
        if args.clip_model is not None:
            scores = score_generations(
                args.output_dir,
                args.data_root,
                kosmosg=args.is_kosmosg,
                clip_model=args.clip_model,
                dino_model=args.dino_model,
                device=accelerator.device,
                allow_partial=args.prompts_per_subject is not None,
                subjects=subjects,
            )
            print(format_score_table(scores), flush=True)
            write_scores(args.output_dir, scores)
            print(f"scores written to {(args.output_dir / SCORE_FILE).resolve()}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from common.distributed import launch_run

    launch_run(Path(__file__).name, args, run)


if __name__ == "__main__":
    main()
