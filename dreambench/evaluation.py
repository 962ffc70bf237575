"""Score a folder of DreamBench generations: the one entry point behind both DreamBench scripts.

`<output_dir>/<subject>/<prompt>.<ext>` holds one generation per prompt (the file name without
extension is the prompt, as in the reference code). Each subject gets its CLIP-T, CLIP-I and DINO
means; the benchmark scores are the means over subjects (every subject weighs the same, as in the
paper). Missing or misnamed files, in the generations or in the DreamBench folder, are reported before
a model is loaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from common.errors import BadInputError, WriteError
from common.images import is_image_file, load_rgb_image
from common.io import atomic_write_json
from common.outputs import check_output_file
from dreambench.benchmark import SUBJECTS, Subject, prompts_for, resolve_subjects
from dreambench.data import load_reference_images, subject_photos
from dreambench.metrics import (
    CLIPPreprocess,
    clip_image_features,
    clip_text_features,
    dino_image_features,
    load_clip,
    load_dino,
    mean_matched_cosine,
    mean_pairwise_cosine,
)

SCORE_FILE = "all_score.json"
METRIC_KEYS = ("clipt_score", "clipi_score", "dino_score")
_GROUP_LABELS = {"object": "objects", "live": "live animals"}


@dataclass
class GenerationSet:
    """The generations found for the requested subjects, and what is absent or not part of the benchmark."""

    images: dict[str, list[tuple[str, Path]]] = field(default_factory=dict)
    missing_subjects: list[str] = field(default_factory=list)
    missing_images: dict[str, list[str]] = field(default_factory=dict)
    unexpected_images: dict[str, list[str]] = field(default_factory=dict)


def find_generations(output_dir: str | os.PathLike, subjects: list[Subject], allow_partial: bool) -> GenerationSet:
    """Match each subject folder against its prompts (one image per prompt).

    Without `allow_partial` any missing subject folder, missing prompt image or image that is not one
    of the prompts is an error, because a mean over a different set of images is not the benchmark
    score. With it, what exists is scored and the gaps are reported; files that are not benchmark
    prompts are never scored.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise BadInputError(f"{output_dir}: generation folder not found")
    found = GenerationSet()
    for subject in subjects:
        subject_dir = output_dir / subject.name
        if not subject_dir.is_dir():
            if not allow_partial:
                raise BadInputError(
                    f"{subject_dir}: folder of subject {subject.name!r} not found "
                    "(expected <output_dir>/<subject>/<prompt>.png; allow_partial scores what exists)"
                )
            found.missing_subjects.append(subject.name)
            continue
        by_prompt: dict[str, Path] = {}
        for path in sorted(subject_dir.iterdir()):
            if not is_image_file(path):
                continue
            if path.stem in by_prompt:
                raise BadInputError(f"{path}: a second image for prompt {path.stem!r} (also {by_prompt[path.stem].name})")
            by_prompt[path.stem] = path
        prompts = prompts_for(subject)
        missing = [prompt for prompt in prompts if prompt not in by_prompt]
        unexpected = sorted(path.name for stem, path in by_prompt.items() if stem not in prompts)
        if not allow_partial and unexpected:
            raise BadInputError(
                f"{subject_dir / unexpected[0]}: not named after one of the {len(prompts)} prompts of {subject.name!r} "
                f"({len(unexpected)} such image(s); allow_partial ignores them)"
            )
        if not allow_partial and missing:
            raise BadInputError(
                f"{subject_dir / (missing[0] + '.png')}: missing generated image "
                f"({len(missing)} of {len(prompts)} prompts of {subject.name!r} missing; allow_partial scores what exists)"
            )
        if unexpected:
            found.unexpected_images[subject.name] = unexpected
        if missing:
            found.missing_images[subject.name] = missing
        present = [(prompt, by_prompt[prompt]) for prompt in prompts if prompt in by_prompt]
        if present:
            found.images[subject.name] = present
        else:
            found.missing_subjects.append(subject.name)
    if not found.images:
        raise BadInputError(f"{output_dir}: no generated images of the requested DreamBench subjects")
    return found


def score_subject(
    generations: list[tuple[str, Path]],
    references: list[Image.Image],
    clip_model: torch.nn.Module,
    clip_preprocess: CLIPPreprocess,
    dino_model: torch.nn.Module,
    batch_size: int,
) -> dict[str, float]:
    """CLIP-T, CLIP-I and DINO of one subject's generations against its reference photos."""
    prompts = [prompt for prompt, _ in generations]
    images = [load_rgb_image(path) for _, path in generations]
    return score_images(prompts, images, references, clip_model, clip_preprocess, dino_model, batch_size)


def score_images(
    prompts: list[str],
    images: list[Image.Image],
    references: list[Image.Image],
    clip_model: torch.nn.Module,
    clip_preprocess: CLIPPreprocess,
    dino_model: torch.nn.Module,
    batch_size: int,
) -> dict[str, float]:
    """The metrics of in-memory generations (one per prompt), as `score_subject` (also used during training)."""
    return {
        **clip_scores(prompts, images, references, clip_model, clip_preprocess, batch_size),
        "dino_score": dino_score(images, references, dino_model, batch_size),
    }


def clip_scores(
    prompts: list[str],
    images: list[Image.Image],
    references: list[Image.Image],
    clip_model: torch.nn.Module,
    clip_preprocess: CLIPPreprocess,
    batch_size: int,
) -> dict[str, float]:
    """CLIP-T (each generation against its prompt) and CLIP-I (against the references): the two metrics of the CLIP model."""
    image_clip = clip_image_features(clip_model, clip_preprocess, images, batch_size)
    return {
        "clipt_score": mean_matched_cosine(image_clip, clip_text_features(clip_model, prompts, batch_size)),
        "clipi_score": mean_pairwise_cosine(image_clip, clip_image_features(clip_model, clip_preprocess, references, batch_size)),
    }


def dino_score(images: list[Image.Image], references: list[Image.Image], dino_model: torch.nn.Module, batch_size: int) -> float:
    """DINO: the mean cosine of the generations' and the references' DINO features."""
    return mean_pairwise_cosine(
        dino_image_features(dino_model, images, batch_size), dino_image_features(dino_model, references, batch_size)
    )


def _mean_scores(per_subject: list[dict[str, Any]]) -> dict[str, float] | None:
    if not per_subject:
        return None
    return {key: sum(row[key] for row in per_subject) / len(per_subject) for key in METRIC_KEYS}


def _check_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise BadInputError(f"device {str(device)!r}: not a torch device name (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"device {str(device)!r}: CUDA is not available on this machine")
    return device


def setting_name(kosmosg: bool) -> str:
    return "kosmosg" if kosmosg else "original"


def check_scores_writable(output_dir: str | os.PathLike, kosmosg: bool) -> Path:
    """Fail before any model loads if `all_score.json` could not be written (a folder of that name, a read-only disk) or holds
    the scores of the other setting, which writing these would silently replace."""
    path = check_output_file(Path(output_dir) / SCORE_FILE, "--output_dir")
    try:
        recorded = json.loads(path.read_text()).get("setting")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):  # none yet, or not ours: replaced as before
        return path
    if recorded in ("original", "kosmosg") and recorded != setting_name(kosmosg):
        raise BadInputError(
            f"{path} holds the scores of the {recorded} setting; scoring the {setting_name(kosmosg)} setting would replace them: "
            f"pass --is_kosmosg {recorded == 'kosmosg'}, or move that file away first"
        )
    return path


def write_scores(output_dir: str | os.PathLike, scores: dict[str, Any]) -> Path:
    """Write `output_dir/all_score.json` atomically; a failure is one line naming the path.

    Scripts print the score table before calling this, so a failed write leaves the printed scores.
    """
    path = Path(output_dir) / SCORE_FILE
    try:
        return atomic_write_json(path, scores)
    except OSError as error:  # a WriteError already names the file and the cause
        cause = str(error) if isinstance(error, WriteError) else f"cannot write {path}: {error.strerror or type(error).__name__}"
        raise WriteError(f"{cause}; the table printed above is the record") from None


def score_generations(
    output_dir: str | os.PathLike,
    data_root: str | os.PathLike,
    kosmosg: bool,
    clip_model: str | os.PathLike,
    dino_model: str | os.PathLike,
    device: str | torch.device,
    batch_size: int = 25,
    allow_partial: bool = False,
    subjects: list[str] | None = None,
    clip_download_root: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Score `output_dir` and return what `write_scores` stores as `all_score.json`.

    `kosmosg` selects the reference photos for CLIP-I and DINO: all photos of the subject (original
    setting) or only the Kosmos-G image. `subjects` restricts scoring to some subjects (default all
    30). The result keeps the reference code's top-level keys (`clipt_score`, `clipi_score`,
    `dino_score`, as numbers) and adds group means, a per-subject breakdown and the gaps;
    `complete` is true only when all 750 benchmark images were scored.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    wanted = resolve_subjects(subjects)
    for subject in wanted:  # every subject scored, so that none fails half-way; only those: a copy of them is enough
        subject_photos(data_root, subject)
    generations = find_generations(output_dir, wanted, allow_partial)
    check_scores_writable(output_dir, kosmosg)

    device = _check_device(device)
    clip_net, clip_preprocess = load_clip(clip_model, device, clip_download_root)
    dino_net = load_dino(dino_model, device)
    scored = [subject for subject in wanted if subject.name in generations.images]
    per_subject = {
        subject.name: _subject_row(
            subject, generations.images[subject.name], data_root, kosmosg, clip_net, clip_preprocess, dino_net, batch_size
        )
        for subject in tqdm(scored, desc="DreamBench subjects", unit="subject")
    }
    return {**_summary(per_subject, generations, kosmosg), "clip_model": str(clip_model), "dino_model": str(dino_model)}


def _subject_row(
    subject: Subject,
    images: list[tuple[str, Path]],
    data_root: str | os.PathLike,
    kosmosg: bool,
    clip_net: torch.nn.Module,
    clip_preprocess: CLIPPreprocess,
    dino_net: torch.nn.Module,
    batch_size: int,
) -> dict[str, Any]:
    """One subject's scores against its reference photos (all, or the Kosmos-G one), with its counts."""
    references = load_reference_images(data_root, subject, kosmosg)
    scores = score_subject(images, references, clip_net, clip_preprocess, dino_net, batch_size)
    return {"group": subject.group, **scores, "num_images": len(images), "num_references": len(references)}


def _summary(per_subject: dict[str, dict[str, Any]], generations: GenerationSet, kosmosg: bool) -> dict[str, Any]:
    """The benchmark means (over subjects, then per group), the per-subject rows and the gaps."""
    groups = {group: _mean_scores([row for row in per_subject.values() if row["group"] == group]) for group in ("object", "live")}
    for group, summary in groups.items():
        if summary is not None:
            summary["num_subjects"] = sum(row["group"] == group for row in per_subject.values())
    return {
        **_mean_scores(list(per_subject.values())),
        "setting": setting_name(kosmosg),
        "num_subjects": len(per_subject),
        "num_images": sum(row["num_images"] for row in per_subject.values()),
        "complete": len(per_subject) == len(SUBJECTS) and not generations.missing_images,
        "groups": groups,
        "subjects": per_subject,
        "missing_subjects": generations.missing_subjects,
        "missing_images": generations.missing_images,
        "unexpected_images": generations.unexpected_images,
    }


def format_score_table(scores: dict[str, Any]) -> str:
    """Human-readable table of a `score_generations` result: subjects, group means, overall."""
    header = f"{'subject':<20} {'group':<7} {'DINO':>7} {'CLIP-I':>7} {'CLIP-T':>7} {'images':>6}"
    rule = "-" * len(header)

    def row(label: str, group: str, values: dict[str, Any], count: str) -> str:
        return f"{label:<20} {group:<7} {values['dino_score']:>7.4f} {values['clipi_score']:>7.4f} {values['clipt_score']:>7.4f} {count:>6}"

    lines = [f"DreamBench scores ({scores['setting']} setting)", header, rule]
    for name, values in scores["subjects"].items():
        lines.append(row(name, values["group"], values, str(values["num_images"])))
    lines.append(rule)
    for group, summary in scores["groups"].items():
        if summary is not None:
            lines.append(row(f"{_GROUP_LABELS[group]} ({summary['num_subjects']})", "", summary, ""))
    lines.append(row(f"overall ({scores['num_subjects']})", "", scores, str(scores["num_images"])))
    if scores["missing_subjects"]:
        lines.append(f"missing subjects: {', '.join(scores['missing_subjects'])}")
    for subject, prompts in scores["missing_images"].items():
        lines.append(f"{subject}: {len(prompts)} prompt image(s) missing")
    for subject, names in scores["unexpected_images"].items():
        lines.append(f"{subject}: {len(names)} image(s) not named after a prompt, not scored")
    if not scores["complete"]:
        lines.append("incomplete: not the full 30 x 25 benchmark, not comparable with published scores")
    return "\n".join(lines)
