"""Score DreamBench generations with CLIP-T, CLIP-I and DINO and write <output_dir>/all_score.json.

    python evaluate_dreambooth.py --output_dir GEN --data_root dreambench --is_kosmosg False \
        --clip_model ViT-B/32 --dino_model facebook/dino-vits16

GEN holds <subject>/<prompt>.png, one image per prompt (as written by inference_dreambooth.py).
The subjects, the setting and whether the run was partial default to what GEN/run_config.json
recorded, so a subset run is scored as it was made.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from common.checks import require_flags_in_range
from common.cli import ArgumentParser, exit_on_reported_error, parse_config, quiet_libraries, str2bool
from common.errors import BadInputError
from common.flags import add_evaluation_args
from dreambench.benchmark import resolve_subjects
from dreambench.config import EvaluateConfig

PROG = Path(__file__).name


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
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
    return parser


def apply_recorded_defaults(config: EvaluateConfig) -> tuple[EvaluateConfig, list[str]]:
    """Fill unset --subjects/--is_kosmosg (and --allow_partial for a --prompts_per_subject run) from run_config.json; also which were taken.

    A setting is how the images were made (the references they were conditioned on, the scale), so
    an --is_kosmosg other than the recorded one is refused rather than scored against the wrong photos.
    """
    from dreambench.run_config import read_run_config, run_config_path

    recorded = read_run_config(config.output_dir) or {}
    if config.is_kosmosg is not None and "is_kosmosg" in recorded and config.is_kosmosg != bool(recorded["is_kosmosg"]):
        raise BadInputError(
            f"--is_kosmosg {config.is_kosmosg}: {run_config_path(config.output_dir)} says these images were made with --is_kosmosg "
            f"{bool(recorded['is_kosmosg'])}; leave --is_kosmosg out to score them in their setting"
        )
    taken = []
    if config.subjects is None and recorded.get("subjects"):
        config, taken = replace(config, subjects=recorded["subjects"]), [*taken, "subjects"]
    if config.is_kosmosg is None:
        config = replace(config, is_kosmosg=bool(recorded.get("is_kosmosg", False)))
        taken += ["is_kosmosg"] * ("is_kosmosg" in recorded)
    if not config.allow_partial and recorded.get("prompts_per_subject") is not None:
        config, taken = replace(config, allow_partial=True), [*taken, "allow_partial (a --prompts_per_subject run)"]
    if config.subjects is not None:
        config = replace(config, subjects=[subject.name for subject in resolve_subjects(config.subjects)])
    return config, taken


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(build_parser(), EvaluateConfig, argv)
    # Imported once the arguments are parsed: --help must not wait for torch, CLIP and transformers.
    from dreambench.evaluation import METRIC_KEYS, SCORE_FILE, format_score_table, score_generations, write_scores
    from dreambench.run_config import run_config_path

    quiet_libraries()
    with exit_on_reported_error(PROG):
        require_flags_in_range(config, ("batch_size",), minimum=1)
        config, taken = apply_recorded_defaults(config)
        if taken:
            print(f"from {run_config_path(config.output_dir)}: {', '.join(taken)}")
        scores = score_generations(
            output_dir=config.output_dir,
            data_root=config.data_root,
            kosmosg=config.is_kosmosg,
            clip_model=config.clip_model,
            dino_model=config.dino_model,
            device=config.device,
            batch_size=config.batch_size,
            allow_partial=config.allow_partial,
            subjects=config.subjects,
        )
    print(format_score_table(scores))
    print(", ".join(f"{key}: {scores[key]:.4f}" for key in METRIC_KEYS), flush=True)
    with exit_on_reported_error(PROG):
        write_scores(config.output_dir, scores)
    print(f"scores written to {(Path(config.output_dir) / SCORE_FILE).resolve()}")
    return scores


if __name__ == "__main__":
    main()
