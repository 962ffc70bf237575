"""README.md and docs/: every link resolves and every flag of every command shown exists in that script's --help.

The long commands (real SDXL weights, 30k steps) cannot run here; their flags are what goes stale
when a flag is renamed, so each one is checked against the script it is passed to.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    ROOT / "README.md",
    ROOT / "ARCHITECTURE.md",
    ROOT / "patch_quality" / "README.md",
    ROOT / "training_data" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]
SCRIPTS = ("train_patchdpo.py", "inference_dreambooth.py", "evaluate_dreambooth.py", "generate.py", "demo.py")
LAUNCHER_FLAGS = {"-m"}  # accelerate / torchrun flags come before the script and are not checked


def command_lines(page: Path) -> list[str]:
    """Each shell command of the page's ```bash blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)
    joined = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in joined if line and not line.startswith("#")]


def script_call(command: str) -> tuple[str, list[str]] | None:
    """(script or -m module, the flags given to it) of a command that runs one of ours, else None."""
    words = shlex.split(command.split("#")[0].split("&&")[-1].split("; ")[0].replace("...", ""))
    for index, word in enumerate(words):
        if word in SCRIPTS:
            return word, [w.split("=")[0] for w in words[index + 1 :] if w.startswith("--")]
        if word == "-m" and index + 1 < len(words) and words[index + 1].startswith(("patch_quality.", "training_data.", "patchdpo.")):
            return words[index + 1], [w.split("=")[0] for w in words[index + 2 :] if w.startswith("--")]
    return None


@cache
def help_text(script: str) -> str:
    command = [sys.executable, "-m", script] if not script.endswith(".py") else [sys.executable, str(ROOT / script)]
    result = subprocess.run([*command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


CALLS = [(page.name, command, call) for page in PAGES for command in command_lines(page) if (call := script_call(command))]


def test_the_pages_show_commands_of_every_script():
    assert {call[0] for _, _, call in CALLS} >= {*SCRIPTS[:4], "training_data.construct", "patch_quality.maps"}


@pytest.mark.parametrize("page, command, call", CALLS, ids=[f"{page}:{call[0]}:{i}" for i, (page, _, call) in enumerate(CALLS)])
def test_every_flag_of_a_shown_command_exists(page, command, call):
    script, flags = call
    known = set(re.findall(r"(--[a-z0-9_]+)", help_text(script)))
    assert not [flag for flag in flags if flag not in known], f"{page}: {command}"


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_every_relative_link_resolves(page):
    links = [link for link in re.findall(r"\]\(([^)#]+)\)", page.read_text()) if not link.startswith("http")]
    assert [link for link in links if not (page.parent / link).exists()] == []


MODEL_VARIABLES = {"SDXL", "ENC", "IPA", "BACKBONE", "CLIP", "DINO"}


def test_the_own_subject_walkthrough_runs_as_written_on_four_photos(tiny_models, tiny_dinov2_dir, tiny_clip_path, tiny_dino_dir, tmp_path):
    """docs/your_subject.md's flow, photos -> construct -> maps -> train -> generate + scores, with the page's step counts and
    flags; only the model variables (tiny stand-ins) and the SIZE_* variables (small images) are replaced."""
    from PIL import Image

    block = next(
        text for text in re.findall(r"```bash\n(.*?)```", (ROOT / "docs" / "your_subject.md").read_text(), flags=re.S) if "SDXL=" in text
    )
    lines = block.replace("\\\n", " ").splitlines()
    settings = [line for line in lines if re.match(r"^[A-Z_]+=", line)]
    commands = [line for line in lines if line and line not in settings]
    assert len(settings) == 3 and len(commands) == 4
    photos = tmp_path / "photos"
    photos.mkdir()
    for index, color in enumerate(("red", "blue", "green", "orange")):
        image = Image.new("RGB", (96, 80), "white")
        image.paste(Image.new("RGB", (40, 40), color), (20 + 10 * index, 20))
        image.save(photos / f"{index}.png")
    (tmp_path / "photos.json").write_text(json.dumps([{"image": str(path), "category": "toy"} for path in sorted(photos.iterdir())]))
    ours = {
        "SDXL": tiny_models.sdxl_dir, "ENC": tiny_models.image_encoder_dir, "IPA": tiny_models.ip_ckpt, "BACKBONE": tiny_dinov2_dir,
        "CLIP": tiny_clip_path, "DINO": tiny_dino_dir, "PHOTOS": photos, "LIST": tmp_path / "photos.json",
        "SIZE_GEN": "--height 32 --width 32 --num_inference_steps 2", "SIZE_MAP": "--resolution 32", "SIZE_TRAIN": "--resolution 32",
        "SIZE_OUT": "--height 32 --width 32 --num_inference_steps 2 --num_images 1",
    }  # fmt: skip
    page = {name for line in settings for name in re.findall(r"([A-Z_]+)=", line)}
    assert set(ours) == page - {"STEPS"} and set(ours) <= MODEL_VARIABLES | {"PHOTOS", "LIST"} | {n for n in page if n.startswith("SIZE_")}
    for script in ("train_patchdpo.py", "generate.py"):
        (tmp_path / script).symlink_to(ROOT / script)
    overrides = "".join(f"{name}={shlex.quote(str(value))}\n" for name, value in ours.items())
    script = "set -e\n" + "\n".join(settings) + "\n" + overrides + "\n".join(commands)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    steps = int(re.search(r"STEPS=(\d+)", block).group(1))
    assert f"training {steps} optimizer steps of 4 pairs (--stop_step {steps})" in result.stdout
    assert (tmp_path / "my_run" / f"checkpoint-{steps}" / "model.bin").is_file()
    scores = json.loads((tmp_path / "my_dog" / "scores.json").read_text())
    assert len(scores) == 2 and all(set(row) == {"clipt_score", "clipi_score", "dino_score"} for row in scores.values())
    assert result.stdout.strip().splitlines()[-1].startswith("images in")
