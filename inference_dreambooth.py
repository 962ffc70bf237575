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
from common.cli import ArgumentParser, parse_config, str2bool
from common.flags import (
    add_ddp_timeout_arg,
    add_generator_args,
    add_metric_model_args,
    add_sampling_args,
    add_speed_args,
    sampling_settings,
)
from dreambench.config import InferenceConfig

if TYPE_CHECKING:
    from collections.abc import Callable

    from accelerate import Accelerator
    from PIL import Image


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


def check_args(config: InferenceConfig) -> None:
    """Numbers, sizes and paths before any model loads (the metric models are loaded by `run`, on the main process)."""
    from base_models.generation import check_generator_paths
    from common.outputs import check_output_dir
    from dreambench.evaluation import check_scores_writable

    require_flags_in_range(config, ("batch_size", "prompts_per_subject"), minimum=1)
    require_sampling_args(config)
    require_flags_in_range(config, ("scale",), minimum=0)
    check_output_dir(config.output_dir)
    if config.scoring:  # fail now rather than after hours of generation
        check_scores_writable(config.output_dir, config.is_kosmosg)
    check_generator_paths(config.base_model_path, config.image_encoder_path, config.ip_ckpt)


def checked_subject_prompts(config: InferenceConfig) -> dict[str, list[str]]:
    """Each subject's prompts (the first --prompts_per_subject); a broken data root fails here, before any model is loaded."""
    from dreambench.benchmark import prompts_for, resolve_subjects
    from dreambench.data import check_boxes_inside_photos, reference_photos

    subjects = [subject.name for subject in resolve_subjects(config.subjects)]
    for subject in subjects:
        check_boxes_inside_photos(reference_photos(config.data_root, subject, config.is_kosmosg))
    return {subject: prompts_for(subject)[: config.prompts_per_subject] for subject in subjects}


def finish(
    config: InferenceConfig,
    accelerator: Accelerator,
    subject_prompts: dict[str, list[str]],
    load_references: Callable[[str], list[Image.Image]],
) -> None:
    """On the main process: the contact sheets, and the scores when a metric model was given."""
    from dreambench.contact_sheet import GRIDS_DIR, write_contact_sheets
    from dreambench.evaluation import SCORE_FILE, format_score_table, score_generations, write_scores

    write_contact_sheets(config.output_dir, subject_prompts, load_references)
    accelerator.print(f"images in {config.output_dir.resolve()}, contact sheets in {(config.output_dir / GRIDS_DIR).resolve()}")
    if config.clip_model is not None:
        scores = score_generations(
            config.output_dir,
            config.data_root,
            kosmosg=config.is_kosmosg,
            clip_model=config.clip_model,
            dino_model=config.dino_model,
            device=accelerator.device,
            allow_partial=config.prompts_per_subject is not None,
            subjects=list(subject_prompts),
        )
        print(format_score_table(scores), flush=True)
        write_scores(config.output_dir, scores)
        print(f"scores written to {(config.output_dir / SCORE_FILE).resolve()}")


def run(config: InferenceConfig, accelerator: Accelerator, held: contextlib.ExitStack) -> None:
    """Generate and score; the output folder is claimed into `held` once inputs and models are checked (released when it closes)."""
    # Imported here, not at the top: --help must not wait for torch and diffusers.
    from dataclasses import asdict

    from base_models.generation import load_generation_model, with_model_defaults
    from common.distributed import check_on_main
    from common.hub import resolve_file
    from common.io import sha256_file
    from common.launch import check_launch
    from dreambench.contact_sheet import GRIDS_DIR
    from dreambench.data import load_conditioning_images
    from dreambench.generation import build_items, generate_items, pending_items
    from dreambench.metrics import check_metric_models
    from dreambench.run_config import check_resumable, make_run_config, start_in_output_dir
    from ip_adapter.batch_generation import SubjectTokens
    from ip_adapter.loading import dtype_name, resolve_dtype
    from ip_adapter.speed import apply_speed_settings

    check_launch(accelerator.num_processes, "inference_dreambooth.py")
    config = with_model_defaults(config.with_defaults())
    check_args(config)
    check_on_main(accelerator, lambda: check_metric_models(config.clip_model, config.dino_model))  # loaded once: a bad one fails now
    subject_prompts = checked_subject_prompts(config)
    subjects = list(subject_prompts)

    def load_references(subject: str) -> list[Image.Image]:
        return load_conditioning_images(config.data_root, subject, config.is_kosmosg)

    dtype = resolve_dtype(config.dtype, accelerator.mixed_precision, accelerator.device)
    run_config = make_run_config(
        asdict(config),
        ip_ckpt_sha256=sha256_file(resolve_file(config.ip_ckpt, "--ip_ckpt")),
        dtype=dtype_name(dtype),
        num_processes=accelerator.num_processes,
    )
    check_resumable(config.output_dir, run_config)  # every process checks, so all of them stop together
    items = build_items(subject_prompts, config.seed)
    pending = pending_items(items, config.output_dir)
    # Every process must list the same pending images (or the contiguous shards would overlap or
    # leave gaps), so nothing is written before all of them have listed.
    accelerator.wait_for_everyone()
    accelerator.print(
        f"{len(items) - len(pending)}/{len(items)} images exist, generating {len(pending)} on "
        f"{accelerator.num_processes} process(es) in {dtype_name(dtype)}, scale {config.scale}"
    )
    ip_model = None
    if pending:
        ip_model = load_generation_model(config.base_model_path, config.image_encoder_path, config.ip_ckpt, accelerator.device, dtype)
        apply_speed_settings(ip_model.denoiser, compile=config.compile, allow_tf32=config.allow_tf32, announce=accelerator.print)
    start_in_output_dir(accelerator, held, config.output_dir, [*subjects, GRIDS_DIR], run_config)

    if ip_model is not None:
        tokens = SubjectTokens(ip_model, load_references)
        with accelerator.split_between_processes(pending) as shard:
            generate_items(
                ip_model,
                tokens,
                shard,
                config.output_dir,
                config.batch_size,
                scale=config.scale,
                progress_position=accelerator.process_index,
                **sampling_settings(config),
            )
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        finish(config, accelerator, subject_prompts, load_references)


def main(argv: list[str] | None = None) -> None:
    config = parse_config(build_parser(), InferenceConfig, argv)
    from common.distributed import launch_run

    launch_run(Path(__file__).name, config, run, config.ddp_timeout)


if __name__ == "__main__":
    main()
