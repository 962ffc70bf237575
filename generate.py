"""Your own subject: photos in, personalized images out.

    python generate.py --base_model_path SG161222/RealVisXL_V1.0 \
      --image_encoder_path h94/IP-Adapter/models/image_encoder \
      --ip_ckpt h94/IP-Adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.bin output/exp1/checkpoint-30000/model.bin \
      --reference_images photos/ --prompts "a dog on the beach" "a dog in the snow" --output_dir my_dog

Several photos are averaged into one subject (DreamBench's original setting); each is padded to a
white square, or cropped first to its box from `--boxes`. With several `--ip_ckpt`, every image is
made with each checkpoint on the same noise and `sheets/` holds one side-by-side sheet per prompt
(a column per checkpoint). Rerunning the same command resumes; the photos are recorded by path,
content and box, and since every image averages all of them, a changed, added or removed photo or
box makes every image again (moved or renamed photos change nothing). `--clip_model` scores each
checkpoint's CLIP-T (against the prompts) and CLIP-I, `--dino_model` its DINO (against your
photos), as DreamBench does; each model is loaded once before the first image. Launch with
`accelerate launch` or `torchrun` to share the images between processes.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.checks import require_flags_in_range, require_sampling_args
from common.cli import ArgumentParser, parse_config
from common.flags import PAPER_CLIP_MODEL, PAPER_DINO_MODEL, add_ddp_timeout_arg, add_sampling_args, add_speed_args, sampling_settings
from dreambench.config import GenerateConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

    from dreambench.your_subject import ImageJob, Photo

SCORES_NAME = "scores.json"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="generate.py", description="Personalized images of your own subject from your photos.")
    models = parser.add_argument_group("models")
    models.add_argument("--base_model_path", type=Path, required=True, help="SDXL or SD 1.5 pipeline: folder or Hugging Face id")
    models.add_argument("--image_encoder_path", type=Path, required=True, help="CLIP ViT-H vision encoder: folder or Hugging Face id")
    models.add_argument(
        "--ip_ckpt",
        type=Path,
        nargs="+",
        action="extend",
        required=True,
        help="IP-Adapter-Plus / PatchDPO checkpoint(s): .bin/.safetensors file or REPO_ID/path/in/repo.bin; several: side by side",
    )
    models.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None, help="default: fp16 on CUDA, else fp32")
    subject = parser.add_argument_group("your subject and prompts")
    subject.add_argument("--reference_images", nargs="+", required=True, help="photo files and/or folders of photos of one subject")
    subject.add_argument(
        "--boxes",
        type=Path,
        default=None,
        help='JSON {"photos/1.jpg": [x0, y0, x1, y1]} in pixels, keyed by photo path (or by file name when no other photo has it); '
        "default: whole photos",
    )
    subject.add_argument("--prompts", nargs="+", default=[], help="prompts, e.g. 'a dog on the beach'")
    subject.add_argument("--prompts_file", type=Path, default=None, help="text file, one prompt per line")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--num_images", type=int, default=4, help="images per prompt and checkpoint")
    sampling.add_argument("--seed", type=int, default=42, help="each image's seed comes from (seed, prompt, image index)")
    sampling.add_argument("--scale", type=float, default=0.78, help="IP-Adapter scale (the DreamBench scripts' 0.78)")
    add_sampling_args(sampling)
    sampling.add_argument("--batch_size", type=int, default=4, help="images per denoising batch (images do not depend on it)")
    parser.add_argument("--output_dir", type=Path, required=True, help="folder to create or resume")
    add_speed_args(parser)
    add_ddp_timeout_arg(parser)
    scoring = parser.add_argument_group(
        "scoring against your photos (as evaluate_dreambooth.py): each model scores its own metrics, none given: no scores"
    )
    scoring.add_argument(
        "--clip_model",
        default=None,
        help=f"scores CLIP-T (against the prompts) and CLIP-I: openai-clip name (e.g. {PAPER_CLIP_MODEL}, the paper's; fetched as "
        "clip.load does, ~/.cache/clip) or local .pt file",
    )
    scoring.add_argument(
        "--dino_model", default=None, help=f"scores DINO: DINO ViT-S/16 folder or Hugging Face id (e.g. {PAPER_DINO_MODEL}, the paper's)"
    )
    return parser


def check_args(config: GenerateConfig) -> None:
    """Numbers, sizes and paths before any model loads."""
    from base_models.generation import check_base_model
    from common.outputs import check_output_dir, check_output_file
    from ip_adapter.loading import check_image_encoder_dir, check_ip_ckpt

    require_flags_in_range(config, ("num_images", "batch_size"), minimum=1)
    require_flags_in_range(config, ("scale",), minimum=0)
    require_sampling_args(config)
    check_output_dir(config.output_dir)
    check_base_model(config.base_model_path)
    check_image_encoder_dir(config.image_encoder_path)
    for checkpoint in config.ip_ckpt:
        check_ip_ckpt(checkpoint)
    if config.scoring:
        check_output_file(config.output_dir / SCORES_NAME, "--output_dir")


def recorded_settings(
    config: GenerateConfig, checkpoints: list[Path], photos: list[Photo], labels: list[str], dtype: str, num_processes: int
) -> dict[str, Any]:
    """What `run_config.json` records: the flags (the photos and checkpoints by content, not by path), dtype and process count."""
    from dataclasses import asdict

    from common.io import sha256_file
    from dreambench.run_config import make_run_config

    return make_run_config(
        {key: value for key, value in asdict(config).items() if key not in ("reference_images", "ip_ckpt", "boxes")},
        ip_ckpt_sha256=[sha256_file(path) for path in checkpoints],
        photos=[photo.record() for photo in photos],
        checkpoint_labels=labels,
        data_root=None,
        is_kosmosg=False,
        dtype=dtype,
        num_processes=num_processes,
    )


def run(config: GenerateConfig, accelerator: Accelerator, held: contextlib.ExitStack) -> None:
    from base_models import family_of
    from base_models.generation import load_generation_model, with_model_defaults
    from common.distributed import check_on_main
    from common.hub import resolve_file
    from common.launch import check_launch
    from dreambench.metrics import check_metric_models
    from dreambench.run_config import GENERATION_KEYS, check_resumable, read_run_config, start_in_output_dir
    from dreambench.your_subject import (
        SHEETS_DIR,
        build_jobs,
        checkpoint_labels,
        conditioning_images,
        generate_jobs,
        read_photos,
        read_prompts,
        subject_changes,
    )
    from ip_adapter.loading import dtype_name, resolve_dtype
    from ip_adapter.speed import apply_speed_settings

    check_launch(accelerator.num_processes, "generate.py")
    config = with_model_defaults(config)
    check_args(config)
    check_on_main(accelerator, lambda: check_metric_models(config.clip_model, config.dino_model))  # only the main process scores
    prompts = read_prompts(config.prompts, config.prompts_file)
    photos = read_photos(config.reference_images, config.boxes)
    references = conditioning_images(photos)  # every photo decoded: a bad one fails before the models
    checkpoints = [resolve_file(path, "--ip_ckpt") for path in config.ip_ckpt]
    read_checkpoint = family_of(config.base_model_path, "--base_model_path").ip_adapter_class().read_checkpoint
    for checkpoint in checkpoints:
        read_checkpoint(checkpoint)  # a NaN or wiped checkpoint fails before the base model loads
    labels = checkpoint_labels(config.ip_ckpt)
    jobs = build_jobs(labels, prompts, config.num_images, config.seed)
    dtype = resolve_dtype(config.dtype, accelerator.mixed_precision, accelerator.device)
    run_config = recorded_settings(config, checkpoints, photos, labels, dtype_name(dtype), accelerator.num_processes)
    check_resumable(config.output_dir, run_config, (*GENERATION_KEYS, "checkpoint_labels"))  # the photos are compared below, not refused
    recorded = read_run_config(config.output_dir)
    changes = [] if recorded is None else subject_changes(recorded.get("photos"), photos)
    pending = list(jobs) if changes else [job for job in jobs if not job.path(config.output_dir).is_file()]
    accelerator.wait_for_everyone()  # every process lists the same pending images before any is written
    accelerator.print(
        f"{len(jobs) - len(pending)}/{len(jobs)} images exist: {len(prompts)} prompt(s) x {config.num_images} x "
        f"{len(labels)} checkpoint(s), {len(photos)} photo(s), {accelerator.num_processes} process(es), {dtype_name(dtype)}"
    )
    model = (
        load_generation_model(config.base_model_path, config.image_encoder_path, checkpoints[0], accelerator.device, dtype)
        if pending
        else None
    )
    drop_outdated = (lambda: start_afresh(config.output_dir, [*labels, SHEETS_DIR], changes, len(jobs))) if changes else None
    start_in_output_dir(accelerator, held, config.output_dir, [*labels, SHEETS_DIR], run_config, drop_outdated)
    if model is not None:
        apply_speed_settings(model.denoiser, compile=config.compile, allow_tf32=config.allow_tf32, announce=accelerator.print)
        generate_jobs(
            model,
            checkpoints,
            labels,
            pending,
            references,
            config.output_dir,
            config.batch_size,
            scale=config.scale,
            share=accelerator.split_between_processes,
            position=accelerator.process_index,
            **sampling_settings(config),
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finish(config, labels, prompts, jobs, photos, accelerator.device)


def finish(config: GenerateConfig, labels: list[str], prompts: list[str], jobs: list[ImageJob], photos: list[Photo], device: Any) -> None:
    """On the main process: the side-by-side sheets, and the scores when a metric model was given."""
    from dreambench.your_subject import score_checkpoints, write_sheets

    sheets = write_sheets(config.output_dir, labels, prompts, config.num_images)
    if config.scoring:
        write_scores(config.output_dir, score_checkpoints(config.output_dir, jobs, photos, config.clip_model, config.dino_model, device))
    print(f"images in {config.output_dir.resolve()}/<checkpoint>/, side-by-side sheets in {sheets[0].parent}")


def write_scores(output_dir: Path, scores: dict[str, dict[str, float]]) -> None:
    """Print each checkpoint's scores and keep them in `scores.json`."""
    from common.io import atomic_write_json

    for label, row in scores.items():
        print(f"{label}: " + ", ".join(f"{key} {value:.4f}" for key, value in row.items()), flush=True)
    atomic_write_json(output_dir / SCORES_NAME, scores)


def start_afresh(output_dir: Path, folders: list[str], changes: list[str], count: int) -> None:
    """Say which photos changed and delete what was made from the old ones: every image, the sheets and the scores."""
    from dreambench.run_config import run_config_path
    from dreambench.your_subject import remove_images

    shown = "; ".join(changes[:3]) + (f"; {len(changes) - 3} more" if len(changes) > 3 else "")
    print(
        f"your photos changed since {run_config_path(output_dir)} was written ({shown}): making all {count} images again, "
        "as every image averages all the photos",
        flush=True,
    )
    remove_images(output_dir, folders)
    (output_dir / SCORES_NAME).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    config = parse_config(build_parser(), GenerateConfig, argv)
    from common.distributed import launch_run

    launch_run("generate.py", config, run, config.ddp_timeout)


if __name__ == "__main__":
    main()
