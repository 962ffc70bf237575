"""Names and paths of the training-pair data folder, shared by construction, maps and training.

The layout is the official one, so data made by either side works with the other:

    DATA/sample{i}/{prompt}_entity_0.png    reference image (object on a clean background)
    DATA/sample{i}/{prompt}_gen_{k}.png     k-th image generated from that reference
    DATA/manifest.json                      what made every sample (written by construct.py)
    DATA/patch_quality.safetensors          quality maps (written by maps.py, read by training)

The prompt is recovered from the file name by splitting at `_`, so a prompt never contains `_`.
Samples are ordered by their numeric index, never by string order ("sample10" after "sample9").
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from common.errors import BadInputError
from common.filenames import file_name_problem

MANIFEST_NAME = "manifest.json"
QUALITY_MAPS_NAME = "patch_quality.safetensors"

_SAMPLE_DIR = re.compile(r"^sample(\d+)$")
_IMAGE_FILE = re.compile(r"^(?P<prompt>[^_/]+)_(?:(?P<entity>entity_0)|gen_(?P<k>\d+))\.png$")


_LONGEST_SUFFIX_BYTES = len("_gen_999.png")


def check_prompt(prompt: str) -> str:
    """Return `prompt` if it can be stored in a file name of this layout, else raise one line."""
    problem = "it holds '_' (the layout's separator)" if "_" in prompt else file_name_problem(prompt, _LONGEST_SUFFIX_BYTES)
    if problem is not None:
        raise BadInputError(f"prompt {prompt[:80]!r} cannot name a data file: {problem}")
    return prompt


def sample_dir(data_root: str | os.PathLike, index: int) -> Path:
    return Path(data_root) / f"sample{index}"


def sample_index(path: str | os.PathLike) -> int:
    match = _SAMPLE_DIR.match(Path(path).name)
    if match is None:
        raise BadInputError(f"{path} is not a sample folder (expected a name like 'sample3')")
    return int(match.group(1))


def reference_path(sample_folder: str | os.PathLike, prompt: str) -> Path:
    return Path(sample_folder) / f"{check_prompt(prompt)}_entity_0.png"


def generated_path(sample_folder: str | os.PathLike, prompt: str, k: int) -> Path:
    return Path(sample_folder) / f"{check_prompt(prompt)}_gen_{k}.png"


def list_samples(data_root: str | os.PathLike) -> list[Path]:
    """Every `sample{i}` folder of `data_root`, sorted by i; other entries are ignored."""
    root = Path(data_root)
    if not root.is_dir():
        raise BadInputError(f"data folder not found: {root}")
    samples = [entry for entry in root.iterdir() if entry.is_dir() and _SAMPLE_DIR.match(entry.name)]
    return sorted(samples, key=sample_index)


def sample_files(sample_folder: str | os.PathLike) -> tuple[str, Path, dict[int, Path]]:
    """Return (prompt, reference image path, {k: generated image path}) of one sample folder.

    Hidden files (e.g. half-written temporaries) and files outside the naming scheme are ignored;
    a folder without a reference, without generated images, or mixing prompts is an error.
    """
    folder = Path(sample_folder)
    if not folder.is_dir():
        raise BadInputError(f"sample folder not found: {folder}")
    prompts: set[str] = set()
    reference: Path | None = None
    generated: dict[int, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        match = _IMAGE_FILE.match(entry.name)
        if match is None:
            continue
        prompts.add(match["prompt"])
        if match["entity"]:
            reference = entry
        else:
            generated[int(match["k"])] = entry
    if len(prompts) > 1:
        raise BadInputError(f"{folder} mixes several prompts {sorted(prompts)}; expected one prompt per sample folder")
    if reference is None:
        raise BadInputError(f"{folder} has no reference image '{{prompt}}_entity_0.png'")
    if not generated:
        raise BadInputError(f"{folder} has no generated image '{{prompt}}_gen_{{k}}.png'")
    return prompts.pop(), reference, dict(sorted(generated.items()))
