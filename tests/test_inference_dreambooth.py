"""inference_dreambooth.py end to end: tiny fixture models, real DreamBench data, 2 steps at 32 px.

Runs are shared between tests through module-scoped fixtures. Runs that batch or shard the same
items differently are compared up to TOLERANCE; the mixed-subject test also shows that conditioning
a row on the wrong subject moves it far beyond that, so those comparisons can fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common.batching
import inference_dreambooth
from base_models.generation import load_generation_model
from common.io import sha256_file
from common.run_lock import LOCK_NAME
from dreambench.benchmark import prompts_for
from dreambench.contact_sheet import contact_sheet_path
from dreambench.data import load_conditioning_images
from dreambench.generation import build_items, image_path
from dreambench.run_config import GENERATION_KEYS, RUN_CONFIG_NAME
from ip_adapter.batch_generation import GenerationItem, SubjectTokens, generate_batch
from tests.kit.cli import bad_input_message

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO_ROOT.parent / "shared" / "dreambench"
SCRIPT = REPO_ROOT / "inference_dreambooth.py"
SUBJECTS = ("backpack", "cat")  # one object (6 references), one live subject (5 references)
PROMPTS_PER_SUBJECT = 3
SIZE = 32
TOLERANCE = 2  # levels of 255 allowed between runs that batch the same items differently


def script_args(tiny_models, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--base_model_path",
        str(tiny_models.sdxl_dir),
        "--image_encoder_path",
        str(tiny_models.image_encoder_dir),
        "--ip_ckpt",
        str(tiny_models.ip_ckpt),
        "--data_root",
        str(DATA_ROOT),
        "--output_dir",
        str(output_dir),
        "--subjects",
        *SUBJECTS,
        "--prompts_per_subject",
        str(PROMPTS_PER_SUBJECT),
        "--num_inference_steps",
        "2",
        "--height",
        str(SIZE),
        "--width",
        str(SIZE),
        *extra,
    ]


def run_script(tiny_models, output_dir: Path, *extra: str) -> Path:
    inference_dreambooth.main(script_args(tiny_models, output_dir, *extra))
    return output_dir


def run_failing(argv: list[str]) -> str:
    return bad_input_message(inference_dreambooth.main, argv)


def all_files(output_dir: Path) -> set[str]:
    return {str(path.relative_to(output_dir)) for path in output_dir.rglob("*") if path.is_file()}


def generated_images(output_dir: Path) -> dict[str, np.ndarray]:
    return {
        str(path.relative_to(output_dir)): np.asarray(Image.open(path), dtype=np.int16)
        for subject in SUBJECTS
        for path in sorted((output_dir / subject).glob("*.png"))
    }


def max_difference(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> int:
    assert first.keys() == second.keys()
    return max(int(np.abs(first[key] - second[key]).max()) for key in first)


def expected_images() -> set[str]:
    return {str(image_path(Path(), subject, prompt)) for subject in SUBJECTS for prompt in prompts_for(subject)[:PROMPTS_PER_SUBJECT]}


@pytest.fixture(scope="module")
def clean_run(tiny_models, tmp_path_factory) -> Path:
    """Batch size 4 over 6 items: the first batch mixes the two subjects."""
    return run_script(tiny_models, tmp_path_factory.mktemp("clean") / "out", "--batch_size", "4")


@pytest.fixture(scope="module")
def batch1_run(tiny_models, tmp_path_factory) -> Path:
    return run_script(tiny_models, tmp_path_factory.mktemp("batch1") / "out", "--batch_size", "1")


@pytest.fixture(scope="module")
def ip_model(tiny_models):
    return load_generation_model(tiny_models.sdxl_dir, tiny_models.image_encoder_dir, tiny_models.ip_ckpt, "cpu", torch.float32)


def test_clean_run_writes_images_grids_and_config(clean_run, tiny_models):
    images = expected_images()
    assert all_files(clean_run) == images | {"grids/backpack.png", "grids/cat.png", RUN_CONFIG_NAME, LOCK_NAME}  # the run owned its folder
    for name in images:
        with Image.open(clean_run / name) as image:
            assert image.size == (SIZE, SIZE) and image.mode == "RGB"
    pixels = generated_images(clean_run)
    assert len({array.tobytes() for array in pixels.values()}) == len(pixels)  # every item has its own image

    config = json.loads((clean_run / RUN_CONFIG_NAME).read_text())
    assert set(GENERATION_KEYS) <= set(config)
    assert config["ip_ckpt_sha256"] == sha256_file(tiny_models.ip_ckpt)
    assert config["scale"] == 0.78 and config["is_kosmosg"] is False
    assert (config["guidance_scale"], config["seed"], config["dtype"]) == (5.0, 42, "float32")
    assert config["subjects"] == list(SUBJECTS) and config["batch_size"] == 4 and config["num_processes"] == 1

    # Contact sheet: the subject's reference crops on the first row, its generations below.
    references = len(load_conditioning_images(DATA_ROOT, "backpack", kosmosg=False))
    with Image.open(contact_sheet_path(clean_run, "backpack")) as sheet:
        assert sheet.size == (references * 260 + 4, 2 * 260 + 4)
        first_tile = np.asarray(sheet.crop((4, 4, 260, 260)).convert("RGB"), dtype=np.float32)
    crop = load_conditioning_images(DATA_ROOT, "backpack", kosmosg=False)[0].resize((256, 256), Image.Resampling.BICUBIC)
    assert np.abs(first_tile - np.asarray(crop, dtype=np.float32)).mean() < 2


def test_batch_size_changes_only_rounding(clean_run, batch1_run):
    assert max_difference(generated_images(clean_run), generated_images(batch1_run)) <= TOLERANCE


def test_mixed_subject_batch_matches_single_subject_batches(ip_model):
    tokens = SubjectTokens(ip_model, lambda subject: load_conditioning_images(DATA_ROOT, subject, kosmosg=False))
    items = build_items({subject: ["a photo in the jungle", "a photo in the snow"] for subject in SUBJECTS}, seed=42)

    def pixels(batch: list[GenerationItem]) -> np.ndarray:
        images = generate_batch(ip_model, tokens, batch, 2, scale=0.78, height=SIZE, width=SIZE)
        return np.stack([np.asarray(image, dtype=np.int16) for image in images])

    mixed = pixels([items[0], items[2]])  # backpack, cat in one batch
    separate = np.concatenate([pixels(items[:2]), pixels(items[2:])])[[0, 2]]
    assert np.abs(mixed - separate).max() <= TOLERANCE
    # The same rows conditioned on the other subject are far apart: the check above can fail.
    swapped = pixels([GenerationItem("cat", items[0].prompt, items[0].seed), GenerationItem("backpack", items[2].prompt, items[2].seed)])
    assert np.abs(swapped - mixed).max() > 10 * TOLERANCE


def test_two_processes_match_one_process(clean_run, tiny_models, tmp_path):
    output_dir = tmp_path / "out"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(SCRIPT),
            *script_args(tiny_models, output_dir, "--batch_size", "4"),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for process in (0, 1):  # each process generated its own half of the 6 items
        assert re.search(rf"process {process}: 100%\|[^|]*\| 3/3 ", result.stderr), result.stderr[-3000:]
    assert json.loads((output_dir / RUN_CONFIG_NAME).read_text())["num_processes"] == 2
    assert all_files(output_dir) == all_files(clean_run)
    assert max_difference(generated_images(clean_run), generated_images(output_dir)) <= TOLERANCE


class Interrupted(Exception):
    pass


def test_resume_after_interrupt_matches_clean_run(batch1_run, tiny_models, tmp_path, monkeypatch):
    """Batch size 1 as in `batch1_run`, so the resumed images must be bit-identical to it."""
    output_dir = tmp_path / "out"
    real_save = common.batching.atomic_save_image
    saved = []

    def save_then_stop(image, path):
        if len(saved) == 2:
            raise Interrupted
        saved.append(real_save(image, path))

    monkeypatch.setattr(common.batching, "atomic_save_image", save_then_stop)
    with pytest.raises(Interrupted):
        run_script(tiny_models, output_dir, "--batch_size", "1")
    assert all_files(output_dir) == {RUN_CONFIG_NAME, LOCK_NAME, *(str(path.relative_to(output_dir)) for path in saved)}
    first_images = {path: path.stat().st_mtime_ns for path in saved}
    # What a SIGKILL during a write leaves behind: the temporary file of an atomic write.
    stale = output_dir / "cat" / ".a cat in the jungle.png.x1y2z3.tmp.png"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"\x89PNG truncated")

    monkeypatch.setattr(common.batching, "atomic_save_image", real_save)
    run_script(tiny_models, output_dir, "--batch_size", "1")
    assert all_files(output_dir) == all_files(batch1_run)
    assert {path: path.stat().st_mtime_ns for path in saved} == first_images  # kept, not regenerated
    assert max_difference(generated_images(batch1_run), generated_images(output_dir)) == 0


def test_sigkill_midway_then_resume_equals_clean_run(tiny_models, tmp_path):
    """A real kill (SIGKILL, no cleanup) while images are being written, then the same command again."""
    extra = ("--batch_size", "1", "--prompts_per_subject", "10")
    killed = tmp_path / "killed"
    argv = script_args(tiny_models, killed, *extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    process = subprocess.Popen([sys.executable, str(SCRIPT), *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finished_images() -> list[Path]:  # temporary files of atomic writes start with "."
        return [path for path in killed.glob("*/*.png") if not path.name.startswith(".")]

    try:
        deadline = time.monotonic() + 120
        while not finished_images() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        process.kill()
        process.wait()
    written = finished_images()
    assert 1 <= len(written) < 20, f"the kill did not land midway ({len(written)} of 20 images written)"
    for path in written:  # atomic writes: whatever exists is a complete image
        Image.open(path).load()

    inference_dreambooth.main(argv)
    clean = run_script(tiny_models, tmp_path / "clean", *extra)
    assert all_files(killed) == all_files(clean)
    assert max_difference(generated_images(clean), generated_images(killed)) <= TOLERANCE


def test_finished_run_is_not_regenerated(clean_run, tiny_models, tmp_path):
    output_dir = tmp_path / "out"
    shutil.copytree(clean_run, output_dir)
    before = {name: (output_dir / name).stat().st_mtime_ns for name in expected_images()}
    run_script(tiny_models, output_dir, "--batch_size", "2")
    assert {name: (output_dir / name).stat().st_mtime_ns for name in expected_images()} == before
    assert json.loads((output_dir / RUN_CONFIG_NAME).read_text())["batch_size"] == 2


@pytest.mark.parametrize(
    ("flag", "value", "key"),
    [("--scale", "0.5", "scale"), ("--seed", "7", "seed"), ("--num_inference_steps", "3", "num_inference_steps")],
)
def test_resume_with_other_settings_is_refused(clean_run, tiny_models, tmp_path, flag, value, key):
    output_dir = tmp_path / "out"
    shutil.copytree(clean_run, output_dir)
    before = {name: (output_dir / name).read_bytes() for name in all_files(output_dir)}
    message = run_failing(script_args(tiny_models, output_dir, flag, value))
    assert RUN_CONFIG_NAME in message and f"{key}:" in message and "--output_dir" in message
    assert {name: (output_dir / name).read_bytes() for name in all_files(output_dir)} == before


def test_other_checkpoint_is_refused(clean_run, tiny_models, tmp_path):
    output_dir = tmp_path / "out"
    shutil.copytree(clean_run, output_dir)
    checkpoint = torch.load(tiny_models.ip_ckpt, weights_only=True)
    checkpoint["ip_adapter"] = {key: value + 1 for key, value in checkpoint["ip_adapter"].items()}
    other = tmp_path / "other.bin"
    torch.save(checkpoint, other)
    argv = script_args(tiny_models, output_dir)
    argv[argv.index("--ip_ckpt") + 1] = str(other)
    assert "ip_ckpt_sha256:" in run_failing(argv)


def test_unreadable_run_config_is_a_one_line_error(tiny_models, tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / RUN_CONFIG_NAME).write_text("{truncated")
    assert str(output_dir / RUN_CONFIG_NAME) in run_failing(script_args(tiny_models, output_dir))
    assert all_files(output_dir) == {RUN_CONFIG_NAME}


def test_kosmosg_setting_conditions_on_one_image(tiny_models, tmp_path):
    output_dir = tmp_path / "out"
    argv = script_args(tiny_models, output_dir, "--is_kosmosg", "True")
    argv[argv.index("--subjects") + 1 : argv.index("--prompts_per_subject")] = ["dog"]
    inference_dreambooth.main(argv)
    config = json.loads((output_dir / RUN_CONFIG_NAME).read_text())
    assert config["is_kosmosg"] is True and config["scale"] == 0.65
    with Image.open(contact_sheet_path(output_dir, "dog")) as sheet:  # 1 reference, 3 generations in 2 columns
        assert sheet.size == (2 * 260 + 4, 3 * 260 + 4)


def test_scores_at_the_end_when_metric_models_are_given(clean_run, tiny_models, tiny_clip_path, tiny_dino_dir, tmp_path, capsys):
    output_dir = tmp_path / "out"
    shutil.copytree(clean_run, output_dir)
    run_script(tiny_models, output_dir, "--clip_model", str(tiny_clip_path), "--dino_model", str(tiny_dino_dir))
    scores = json.loads((output_dir / "all_score.json").read_text())
    assert set(scores["subjects"]) == set(SUBJECTS) and scores["num_images"] == len(SUBJECTS) * PROMPTS_PER_SUBJECT
    assert scores["complete"] is False
    assert all(-1 <= scores[key] <= 1 for key in ("clipt_score", "clipi_score", "dino_score"))
    assert "DreamBench scores" in capsys.readouterr().out


def test_no_scores_without_metric_models(clean_run):
    assert not (clean_run / "all_score.json").exists()


def test_metric_model_errors_come_before_generation(tiny_models, tiny_clip_path, tiny_dino_dir, tmp_path):
    message = run_failing(script_args(tiny_models, tmp_path / "out", "--clip_model", str(tiny_clip_path)))
    assert "--dino_model" in message
    missing = tmp_path / "missing_clip.pt"
    message = run_failing(script_args(tiny_models, tmp_path / "out", "--clip_model", str(missing), "--dino_model", str(tiny_dino_dir)))
    assert str(missing) in message
    message = run_failing(script_args(tiny_models, tmp_path / "out", "--clip_model", str(tiny_clip_path), "--dino_model", str(tmp_path)))
    assert str(tmp_path) in message
    garbage = tmp_path / "garbage.pt"  # exists, but is no CLIP model: refused when loaded, not only when named
    garbage.write_bytes(b"not a checkpoint")
    message = run_failing(script_args(tiny_models, tmp_path / "out", "--clip_model", str(garbage), "--dino_model", str(tiny_dino_dir)))
    assert str(garbage) in message and "not an OpenAI CLIP checkpoint" in message
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((tiny_dino_dir / "config.json").read_text())
    message = run_failing(script_args(tiny_models, tmp_path / "out", "--clip_model", str(tiny_clip_path), "--dino_model", str(weightless)))
    assert str(weightless) in message
    assert not (tmp_path / "out").exists()


def test_scores_at_the_end_need_only_the_subjects_of_the_run(tiny_models, tiny_clip_path, tiny_dino_dir, tmp_path):
    """A DreamBench copy holding just the subjects generated is enough to score them (checked before the first image)."""
    data_root = tmp_path / "dreambench"
    for folder in ("dataset", "json_data"):
        for subject in SUBJECTS:
            (data_root / folder).mkdir(parents=True, exist_ok=True)
            (data_root / folder / subject).symlink_to(DATA_ROOT / folder / subject)
    output_dir = tmp_path / "out"
    argv = _replace(script_args(tiny_models, output_dir, "--clip_model", str(tiny_clip_path)), "--data_root", str(data_root))
    inference_dreambooth.main([*_replace(argv, "--prompts_per_subject", "1"), "--dino_model", str(tiny_dino_dir)])
    assert json.loads((output_dir / "all_score.json").read_text())["num_subjects"] == len(SUBJECTS)


def _replace(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def test_missing_or_incomplete_model_dir_is_a_one_line_error(tiny_models, tmp_path):
    argv = script_args(tiny_models, tmp_path / "out")
    missing = tmp_path / "no_such_model"
    assert str(missing) in run_failing(_replace(argv, "--base_model_path", str(missing)))

    incomplete = tmp_path / "sdxl_without_unet"
    shutil.copytree(tiny_models.sdxl_dir, incomplete, ignore=shutil.ignore_patterns("unet"))
    assert str(incomplete / "unet") in run_failing(_replace(argv, "--base_model_path", str(incomplete)))

    no_weights = tmp_path / "sdxl_without_unet_weights"
    shutil.copytree(tiny_models.sdxl_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert str(no_weights) in run_failing(_replace(argv, "--base_model_path", str(no_weights)))

    no_encoder = tmp_path / "no_encoder"
    assert str(no_encoder) in run_failing(_replace(argv, "--image_encoder_path", str(no_encoder)))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"not a checkpoint", "wrong_layout"])
def test_bad_checkpoint_is_a_one_line_error_and_claims_nothing(tiny_models, tmp_path, content):
    checkpoint = tmp_path / "model.bin"
    if content == "wrong_layout":
        torch.save({"image_proj": {"weight": torch.zeros(2)}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(2)}}, checkpoint)
    else:
        checkpoint.write_bytes(content)
    message = run_failing(_replace(script_args(tiny_models, tmp_path / "out"), "--ip_ckpt", str(checkpoint)))
    assert str(checkpoint) in message
    assert not (tmp_path / "out" / RUN_CONFIG_NAME).exists()  # the fixed command can still use the folder
    assert str(tmp_path / "missing.bin") in run_failing(
        _replace(script_args(tiny_models, tmp_path / "out"), "--ip_ckpt", str(tmp_path / "missing.bin"))
    )


def test_bad_data_root_or_subject_is_a_one_line_error(tiny_models, tmp_path):
    argv = script_args(tiny_models, tmp_path / "out")
    empty_root = tmp_path / "empty_root"
    empty_root.mkdir()
    assert str(empty_root) in run_failing(_replace(argv, "--data_root", str(empty_root)))
    assert "'dragon'" in run_failing(_replace(argv, "--subjects", "dragon"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [("--height", "36", "multiple of 8"), ("--batch_size", "0", "--batch_size"), ("--prompts_per_subject", "0", "--prompts_per_subject")],
)
def test_bad_numbers_are_rejected_before_anything_is_written(tiny_models, tmp_path, flag, value, expected):
    assert expected in run_failing(script_args(tiny_models, tmp_path / "out", flag, value))
    assert not (tmp_path / "out").exists()


def test_prompts_that_are_not_file_names_are_rejected():
    with pytest.raises(ValueError, match="file name"):
        image_path("out", "backpack", "a/b")
    with pytest.raises(ValueError, match="file name"):
        image_path("out", "backpack", ".hidden")
