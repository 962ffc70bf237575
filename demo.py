"""The whole PatchDPO flow in one offline command: data -> patch quality -> training -> DreamBench.

    python demo.py                      # tiny random models; trains on 2 DreamBench subjects, evaluates 2 others
    python demo.py --base_model sd15    # the same on tiny SD 1.5 + IP-Adapter-Plus stand-ins
    python demo.py --base_model flux    # the same on tiny FLUX.1-dev + XLabs IP-Adapter stand-ins
    python demo.py --base_model_path SDXL_DIR --image_encoder_path ENC_DIR --ip_ckpt ip-adapter-plus_sdxl_vit-h.bin \
        --patch_backbone dinov2-base/ --clip_model ViT-B-32.pt --dino_model dino-vits16/ \
        --resolution 512 --size 1024 --num_inference_steps 30 --train_steps 200

Every step calls the real scripts and package CLIs (their `main(argv)`), so the demo exercises
exactly what a researcher runs. Models that are not passed are replaced by tiny random stand-ins
saved in the real on-disk layouts; those draw noise, which the report says plainly. A second run
into the same --output_dir remakes every stage from scratch (the same command gives the same files).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import evaluate_dreambooth
import inference_dreambooth
import train_patchdpo
from common.cli import ArgumentParser, exit_on_reported_error, quiet_libraries
from common.errors import BadInputError
from common.io import atomic_save_image, atomic_write_json
from dreambench.benchmark import get_subject, prompts_for
from dreambench.data import load_conditioning_images

if TYPE_CHECKING:
    from dreambench.report import RunReport

REPO = Path(__file__).resolve().parent
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "dreambench"
STAND_IN_FAMILIES = ("sdxl", "sd15", "flux")  # --base_model: the tiny generators `prepare_models` can save, the default first
TINY_NOTE = (
    "These results come from tiny RANDOM models (no pretrained weights were given), so every image is "
    "noise and the metric values mean nothing: the demo shows that the flow runs end to end. For real "
    "results pass --base_model_path (SDXL folder), --image_encoder_path (CLIP ViT-H folder), --ip_ckpt "
    "(ip-adapter-plus_sdxl_vit-h.bin), --patch_backbone (e.g. a DINOv2 folder), --clip_model (ViT-B-32.pt) "
    "and --dino_model (dino-vits16 folder), with paper-sized --resolution 512 --size 1024 --num_inference_steps 30."
)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path("demo_out"))
    parser.add_argument("--data_root", type=Path, default=DEFAULT_DATA_ROOT, help="DreamBench folder (dataset/, json_data/)")
    parser.add_argument("--subjects", nargs="+", default=["backpack", "dog"], help="1-3 DreamBench subjects to evaluate")
    parser.add_argument(
        "--train_subjects",
        nargs="+",
        default=["can", "cat"],
        help="1-3 DreamBench subjects whose box-cropped photos are the training references (disjoint from --subjects)",
    )
    models = parser.add_argument_group("real models (tiny random stand-ins where absent)")
    models.add_argument(
        "--base_model_path", type=Path, help="SDXL, SD 1.5 or FLUX.1 pipeline folder (with --image_encoder_path and --ip_ckpt)"
    )
    models.add_argument(
        "--base_model",
        choices=STAND_IN_FAMILIES,
        default=None,
        help="without --base_model_path: the family of the tiny stand-in generator (default sdxl, the paper's model)",
    )
    models.add_argument("--image_encoder_path", type=Path, help="the adapter's CLIP vision encoder folder (ViT-H; ViT-L/14 for FLUX.1)")
    models.add_argument("--ip_ckpt", type=Path, help="IP-Adapter checkpoint to start from (IP-Adapter-Plus; XLabs' for FLUX.1)")
    models.add_argument("--patch_backbone", type=Path, help="ViT-family folder for patch quality (DINOv2, DINO, CLIP, ViT)")
    models.add_argument("--clip_model", help="OpenAI CLIP .pt for CLIP-I/CLIP-T (with --dino_model)")
    models.add_argument("--dino_model", type=Path, help="DINO ViT-S/16 folder")
    sizes = parser.add_argument_group("sizes (defaults fit the tiny models on 2 CPU cores)")
    sizes.add_argument("--resolution", type=int, default=64, help="training resolution")
    sizes.add_argument("--size", type=int, default=64, help="generated image edge (construction and DreamBench)")
    sizes.add_argument("--num_inference_steps", type=int, default=8)
    sizes.add_argument("--ssl_steps", type=int, default=60, help="self-supervised backbone finetuning steps (0: skip)")
    sizes.add_argument("--ssl_learning_rate", type=float, default=2e-3, help="a random tiny ViT needs more than ssl_train's 1e-4")
    sizes.add_argument("--train_steps", type=int, default=100)
    sizes.add_argument("--train_batch_size", type=int, default=2)
    sizes.add_argument("--learning_rate", type=float, default=3e-5)
    sizes.add_argument("--prompts_per_subject", type=int, default=None, help="fewer than 25 prompts: a smoke run")
    sizes.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 with the tiny stand-in generator, whose ops are too small to share: on a core another "
        "process keeps busy, a second thread made the demo 10x slower; torch's own choice with a real one)",
    )
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    generator_paths = [args.base_model_path, args.image_encoder_path, args.ip_ckpt]
    if any(path is not None for path in generator_paths) and None in generator_paths:
        parser.error("--base_model_path, --image_encoder_path and --ip_ckpt go together (a checkpoint fits one model)")
    if args.base_model is not None and args.base_model_path is not None:
        parser.error("--base_model picks a stand-in; the family of --base_model_path is read from its model_index.json: drop one")
    if (args.clip_model is None) != (args.dino_model is None):
        parser.error("--clip_model and --dino_model go together")
    if not (args.data_root / "dataset").is_dir():
        parser.error(f"--data_root {args.data_root}: no dataset/ folder; pass your DreamBench copy")
    for flag, names in (("--subjects", args.subjects), ("--train_subjects", args.train_subjects)):
        if not 1 <= len(names) <= 3:
            parser.error(f"{flag}: give 1-3 subjects, got {len(names)}")
    if set(args.subjects) & set(args.train_subjects):
        parser.error(
            f"--train_subjects and --subjects overlap ({sorted(set(args.subjects) & set(args.train_subjects))}): evaluate on unseen subjects"
        )
    for name in args.subjects + args.train_subjects:
        try:
            get_subject(name)
        except ValueError as error:
            parser.error(str(error))
    if args.num_threads is not None and args.num_threads < 1:
        parser.error(f"--num_threads must be >= 1, got {args.num_threads}")


def check_models(args: argparse.Namespace) -> None:
    """Every model the user passed, before the first stage: a bad --dino_model must not wait for training to finish."""
    from base_models.generation import check_generator_paths
    from common.hub import resolve_folder
    from dreambench.metrics import resolve_clip_checkpoint

    if args.base_model_path is not None:
        check_generator_paths(args.base_model_path, args.image_encoder_path, args.ip_ckpt)
    for flag, value in (("--patch_backbone", args.patch_backbone), ("--dino_model", args.dino_model)):
        if value is not None and not (resolve_folder(value, flag) / "config.json").is_file():
            raise BadInputError(f"{flag} {value}: no config.json; expected a transformers model folder (save_pretrained layout)")
    if args.clip_model is not None:
        resolve_clip_checkpoint(args.clip_model)


def use_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU threads (`--num_threads`, or the default for these models) and record the choice in `args`."""
    import torch

    if args.num_threads is None:
        args.num_threads = 1 if args.base_model_path is None else torch.get_num_threads()
    torch.set_num_threads(args.num_threads)


MARKER_NAME = "demo_run.json"  # written first: marks a folder as the demo's own, which a rerun may remake
DEMO_ENTRIES = (
    "models",
    "references",
    "data",
    "ssl_textures",
    "ssl",
    "overlays",
    "train",
    "dreambench_start",
    "dreambench",
    "figures",
    "report.md",
    MARKER_NAME,
)


def start_in(out: Path, argv: list[str]) -> None:
    """Start in `out` (claimed by the caller): a folder of an earlier demo run is remade (its demo entries removed first),
    any other non-empty folder refused, so a rerun never mixes two runs' files and never deletes what the demo did not make."""
    from common.run_lock import LOCK_NAME

    if (out / MARKER_NAME).is_file():
        print(f"{out} holds an earlier demo run: remaking every stage (pass another --output_dir to keep it)", flush=True)
        for name in DEMO_ENTRIES:
            entry = out / name
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)
    else:
        others = sorted(entry.name for entry in out.iterdir() if entry.name != LOCK_NAME)
        if others:
            raise BadInputError(
                f"--output_dir {out} holds files the demo did not make ({', '.join(others[:5])}"
                f"{', ...' if len(others) > 5 else ''}): pass a new or empty folder"
            )
    (out / MARKER_NAME).write_text(json.dumps({"made_by": "demo.py", "argv": argv}, indent=2) + "\n")


def prepare_models(args: argparse.Namespace, models_dir: Path) -> bool:
    """Fill every model path the user left out with a tiny random stand-in; True if any was needed."""
    from stand_ins import flux, sd15, sdxl
    from stand_ins.metric_models import save_tiny_clip_archive, save_tiny_dino
    from stand_ins.vit_models import save_tiny_dinov2

    tiny = False
    if args.base_model_path is None:
        save_generator = {"sdxl": sdxl.save_sdxl_models, "sd15": sd15.save_sd15_models, "flux": flux.save_flux_models}[
            args.base_model or STAND_IN_FAMILIES[0]
        ]
        paths = save_generator(models_dir / "generator")
        args.base_model_path, args.image_encoder_path, args.ip_ckpt = paths.base_model_dir, paths.image_encoder_dir, paths.ip_ckpt
        tiny = True
    if args.patch_backbone is None:
        args.patch_backbone = save_tiny_dinov2(models_dir / "patch_backbone")
        tiny = True
    if args.clip_model is None:
        models_dir.mkdir(parents=True, exist_ok=True)
        args.clip_model = save_tiny_clip_archive(models_dir / "clip-vit-b-32-tiny.pt")
        args.dino_model = save_tiny_dino(models_dir / "dino-vits16-tiny")
        tiny = True
    return tiny


def write_reference_list(args: argparse.Namespace, folder: Path) -> Path:
    """The training subjects' box-cropped DreamBench photos as construction references, with their class words."""
    entries = []
    for name in args.train_subjects:
        subject = get_subject(name)
        for index, image in enumerate(load_conditioning_images(args.data_root, subject, kosmosg=False)):
            path = atomic_save_image(image, folder / f"{name}_{index:02d}.png")
            entries.append({"image": str(path), "category": subject.class_word})
    return atomic_write_json(folder / "references.json", entries)


SSL_TEXTURES = 48  # synthetic textures of the SSL step (a quarter held out for the matching accuracy)


def relative_paths(argv: list[str]) -> list[str]:
    """Absolute paths as paths relative to the working folder, so the report's commands can be copied and run from it."""
    return [os.path.relpath(arg) if os.path.isabs(arg) else arg for arg in argv]


def write_textures(folder: Path, count: int) -> Path:
    """Synthetic textures (every patch differs, like a photo's): where a tiny random ViT's patch matching can improve."""
    from stand_ins.vit_models import structured_texture

    for seed in range(count):
        atomic_save_image(structured_texture(seed, size=128), folder / f"texture_{seed:02d}.png")
    return folder


def run(args: argparse.Namespace) -> RunReport:
    # Imported here: --help must not wait for torch and diffusers.
    from base_models import family_of
    from dreambench.report import RunReport, read_scalar
    from patch_quality import maps, ssl_train, visualize
    from training_data import construct

    out = args.output_dir
    report = RunReport(title="PatchDPO demo: data -> patch quality -> training -> DreamBench")
    timed: list[tuple[str, float]] = report.steps

    def step(name: str, action: Callable[[], object]) -> object:
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        result = action()
        timed.append((name, time.perf_counter() - start))
        return result

    def script(name: str, program: str, main: Callable[[list[str]], object], argv: list[str]) -> object:
        """A stage run through its script's real `main`; the report lists the command that redoes it by hand."""
        report.commands.append((name, f"{program} {shlex.join(relative_paths(argv))}"))
        return step(name, lambda: main(argv))

    if step("models", lambda: prepare_models(args, out / "models")):
        report.notes.append(TINY_NOTE)
    report.config = {key: str(value) for key, value in vars(args).items()}  # with the stand-ins' paths filled in
    report.notes.append(
        f"Training references are box crops of the DreamBench subjects {', '.join(args.train_subjects)}; the evaluation "
        f"uses the disjoint subjects {', '.join(args.subjects)}, so the scores are on subjects the training never saw."
    )
    data, train_dir, bench_dir = out / "data", out / "train", out / "dreambench"
    generator = ["--base_model_path", str(args.base_model_path), "--image_encoder_path", str(args.image_encoder_path)]
    sizes = ["--height", str(args.size), "--width", str(args.size), "--num_inference_steps", str(args.num_inference_steps)]
    references = step("references", lambda: write_reference_list(args, out / "references"))
    script(
        "construct training pairs",
        "python -m training_data.construct",
        construct.main,
        [*generator, "--ip_ckpt", str(args.ip_ckpt), "--output_dir", str(data), "--reference_images", str(references)]
        + ["--num_generated", "1", *sizes],
    )
    finetuned: list[str] = []
    if args.ssl_steps:
        textures = step("synthetic textures for the SSL step", lambda: write_textures(out / "ssl_textures", SSL_TEXTURES))
        ssl = script(
            "self-supervised patch features",
            "python -m patch_quality.ssl_train",
            ssl_train.main,
            ["--backbone", str(args.patch_backbone), "--train_data", str(textures), "--output_dir", str(out / "ssl")]
            + ["--max_train_steps", str(args.ssl_steps), "--learning_rate", str(args.ssl_learning_rate), "--train_batch_size", "8"]
            + ["--trainable_blocks", "1", "--validation_fraction", "0.25", "--validation_pairs_per_image", "4", "--validation_steps", "0"],
        )
        finetuned = ["--finetuned", str(out / "ssl" / ssl_train.FINETUNED_NAME)]
        held_out = round(SSL_TEXTURES * 0.25)
        report.notes.append(
            f"Self-supervised patch-feature finetuning ({args.ssl_steps} steps): top-1 patch matching between two augmented "
            f"views (random crop, flip, colour jitter) of {held_out} held-out synthetic textures, 4 view pairs each: "
            f"{ssl['accuracy_before']:.3f} before -> {ssl['accuracy_after']:.3f} after. The demo trains and measures this step on "
            "textures because on its 64 px photo crops most patches are flat white background, where a tiny random ViT's "
            "matching stays at chance whatever it learns; with a real backbone, run it on your DATA (--train_data DATA)."
        )
    quality_file = data / "patch_quality.safetensors"
    script(
        "patch quality maps",
        "python -m patch_quality.maps",
        maps.main,
        ["--data_root", str(data), "--backbone", str(args.patch_backbone), *finetuned, "--resolution", str(args.resolution)]
        + ["--base_model_path", str(args.base_model_path), "--output", str(quality_file)],
    )
    script(
        "quality map overlays",
        "python -m patch_quality.visualize",
        visualize.main,
        ["--data_root", str(data), "--maps", str(quality_file), "--output_dir", str(out / "overlays"), "--max_samples", "4"],
    )
    script(
        "PatchDPO training",
        "python train_patchdpo.py",
        train_patchdpo.main,
        ["--pretrained_model_name_or_path", str(args.base_model_path), "--image_encoder_path", str(args.image_encoder_path)]
        + ["--pretrained_ip_adapter_path", str(args.ip_ckpt), "--data_root_path", str(data), "--patch_quality_file", str(quality_file)]
        + ["--resolution", str(args.resolution), "--train_batch_size", str(args.train_batch_size)]
        + ["--learning_rate", str(args.learning_rate), "--weight_decay", "0.01", "--stop_step", str(args.train_steps)]
        + ["--save_steps", str(args.train_steps), "--logging_steps", "1", "--output_dir", str(train_dir), "--use_dpo_loss", "True"]
        + ["--overwrite_output_dir"],  # a rerun of the demo trains again from the start
    )
    trained = train_dir / f"checkpoint-{args.train_steps}" / family_of(args.base_model_path).trainable_adapter.checkpoint_files[0]
    smoke = [] if args.prompts_per_subject is None else ["--prompts_per_subject", str(args.prompts_per_subject)]
    for label, checkpoint, folder in (
        ("IP-Adapter-Plus (start)", args.ip_ckpt, out / "dreambench_start"),
        ("PatchDPO (trained)", trained, bench_dir),
    ):
        script(
            f"DreamBench inference: {label}",
            "python inference_dreambooth.py",
            inference_dreambooth.main,
            [*generator, "--ip_ckpt", str(checkpoint), "--data_root", str(args.data_root), "--output_dir", str(folder)]
            + ["--is_kosmosg", "False", "--subjects", *args.subjects, *sizes, *smoke],
        )
        report.scores[label] = script(
            f"DreamBench evaluation: {label}",
            "python evaluate_dreambooth.py",
            evaluate_dreambooth.main,
            ["--output_dir", str(folder), "--data_root", str(args.data_root), "--is_kosmosg", "False"]
            + ["--clip_model", str(args.clip_model), "--dino_model", str(args.dino_model), "--subjects", *args.subjects]
            + (["--allow_partial", "True"] if smoke else []),
        )

    report.loss_points = read_scalar(train_dir / "logs", "loss")
    report.loss_label = "patch-weighted noise MSE per latent element"
    report.overlays = sorted((out / "overlays").glob("*.png"))[:4]
    report.quality_colors = visualize.quality_colors
    for name in args.subjects:
        prompts = prompts_for(name)[: args.prompts_per_subject]
        references = load_conditioning_images(args.data_root, name, kosmosg=False)
        report.comparisons.append((name, prompts, references, out / "dreambench_start", bench_dir))
    return report


@exit_on_reported_error("demo.py")
def main(argv: list[str] | None = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    quiet_libraries()
    check_models(args)
    use_threads(args)
    from common.run_lock import holding_output_dir

    with holding_output_dir(args.output_dir):
        start_in(args.output_dir, list(sys.argv[1:] if argv is None else argv))
        start = time.perf_counter()
        report = run(args)
        path = report.write(args.output_dir, wall_seconds=time.perf_counter() - start)
    print(f"\nDemo finished in {time.perf_counter() - start:.0f} s with {args.num_threads} CPU thread(s). Report: {path.resolve()}")
    return path


if __name__ == "__main__":
    main()
