"""Score DreamBench generations with CLIP-T, CLIP-I and DINO and write <output_dir>/all_score.json.

    python evaluate_dreambooth.py --output_dir GEN --data_root dreambench --is_kosmosg False \
        --clip_model ~/.cache/clip/ViT-B-32.pt --dino_model ./dino-vits16

GEN holds <subject>/<prompt>.png, one image per prompt (as written by inference_dreambooth.py).
Runs fully offline: both metric models must be local.
"""

from __future__ import annotations

import argparse

from common.cli import DefaultsHelpFormatter, fail, str2bool
from common.errors import BadInputError
from dreambench.benchmark import SUBJECT_NAMES
from dreambench.evaluation import METRIC_KEYS, add_evaluation_args, evaluate_generations, format_score_table


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter, description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="folder of generations: <subject>/<prompt>.png")
    parser.add_argument("--data_root", required=True, help="DreamBench folder with dataset/ and json_data/")
    parser.add_argument(
        "--is_kosmosg",
        type=str2bool,
        default=False,
        help="true: compare with the single Kosmos-G image per subject; false: with all its photos",
    )
    parser.add_argument("--subjects", nargs="+", choices=SUBJECT_NAMES, default=None, help="score only these subjects (default: all 30)")
    add_evaluation_args(parser)
    return parser, parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    parser, args = parse_args(argv)
    try:
        scores = evaluate_generations(
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
    except BadInputError as error:
        fail(parser.prog, error)
    print(format_score_table(scores))
    print(", ".join(f"{key}: {scores[key]:.4f}" for key in METRIC_KEYS))
    return scores


if __name__ == "__main__":
    main()
