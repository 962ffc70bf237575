"""Score DreamBench generations with CLIP-T, CLIP-I and DINO and write <output_dir>/all_score.json.

    python evaluate_dreambooth.py --output_dir GEN --data_root dreambench --is_kosmosg False \
        --clip_model ViT-B/32 --dino_model facebook/dino-vits16

GEN holds <subject>/<prompt>.png, one image per prompt (as written by inference_dreambooth.py).
The subjects, the setting and whether the run was partial default to what GEN/run_config.json
recorded, so a subset run is scored as it was made.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.checks import require_flags_in_range
from common.cli import ArgumentParser, fail, quiet_libraries, str2bool
from common.errors import BadInputError, ReportedError
from common.flags import add_evaluation_args
from dreambench.benchmark import resolve_subjects


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="folder of generations: <subject>/<prompt>.png")
    parser.add_argument("--data_root", required=True, help="DreamBench folder with dataset/ and json_data/")
    parser.add_argument(
        "--is_kosmosg",
        type=str2bool,
        default=None,
        help="true: compare with the single Kosmos-G image per subject; false: with all its photos (default: as recorded in "
        "run_config.json, else false)",
    )
    parser.add_argument(
        "--subjects", nargs="+", default=None, help="score only these subjects (default: those recorded in run_config.json, else all 30)"
    )
    add_evaluation_args(parser)
    return parser, parser.parse_args(argv)


def apply_recorded_defaults(args: argparse.Namespace) -> list[str]:
    """Fill unset --subjects/--is_kosmosg (and --allow_partial for a --prompts_per_subject run) from run_config.json.

    A setting is how the images were made (the references they were conditioned on, the scale), so
    an --is_kosmosg other than the recorded one is refused rather than scored against the wrong photos.
    """
    from dreambench.run_config import read_run_config, run_config_path

    recorded = read_run_config(args.output_dir) or {}
    if args.is_kosmosg is not None and "is_kosmosg" in recorded and args.is_kosmosg != bool(recorded["is_kosmosg"]):
        raise BadInputError(
            f"--is_kosmosg {args.is_kosmosg}: {run_config_path(args.output_dir)} says these images were made with --is_kosmosg "
            f"{bool(recorded['is_kosmosg'])}; leave --is_kosmosg out to score them in their setting"
        )
    taken = []
    if args.subjects is None and recorded.get("subjects"):
        args.subjects, taken = recorded["subjects"], [*taken, "subjects"]
    if args.is_kosmosg is None:
        args.is_kosmosg = bool(recorded.get("is_kosmosg", False))
        taken += ["is_kosmosg"] * ("is_kosmosg" in recorded)
    if not args.allow_partial and recorded.get("prompts_per_subject") is not None:
        args.allow_partial, taken = True, [*taken, "allow_partial (a --prompts_per_subject run)"]
    if args.subjects is not None:
        args.subjects = [subject.name for subject in resolve_subjects(args.subjects)]
    return taken


def main(argv: list[str] | None = None) -> dict:
    parser, args = parse_args(argv)
    # Imported once the arguments are parsed: --help must not wait for torch, CLIP and transformers.
    from dreambench.evaluation import METRIC_KEYS, SCORE_FILE, format_score_table, score_generations, write_scores
    from dreambench.run_config import run_config_path

    quiet_libraries()
    try:
        require_flags_in_range(args, ("batch_size",), minimum=1)
        taken = apply_recorded_defaults(args)
        if taken:
            print(f"from {run_config_path(args.output_dir)}: {', '.join(taken)}")
        scores = score_generations(
            output_dir=args.output_dir,
            data_root=args.data_root,
            kosmosg=args.is_kosmosg,
            clip_model=args.clip_model,
            dino_model=args.dino_model,
            device=args.device,
            batch_size=args.batch_size,
            allow_partial=args.allow_partial,
            subjects=args.subjects,
        )
    except ReportedError as error:
        fail(parser.prog, error)
    print(format_score_table(scores))
    print(", ".join(f"{key}: {scores[key]:.4f}" for key in METRIC_KEYS), flush=True)
    try:
        write_scores(args.output_dir, scores)
    except ReportedError as error:
        fail(parser.prog, error)
    print(f"scores written to {(Path(args.output_dir) / SCORE_FILE).resolve()}")
    return scores


if __name__ == "__main__":
    main()
