"""generate.py: your photos and prompts in, images per checkpoint, side-by-side sheets, scores; photos loaded as taken."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import generate
from base_models.generation import load_generation_model
from common.run_lock import LOCK_NAME
from dreambench.your_subject import SHEETS_DIR, conditioning_images, prompt_stem, read_photos
from ip_adapter.checkpoint import load_ip_adapter_checkpoint
from tests.kit.cli import bad_input_message

SIZE = 32
REPO = Path(__file__).resolve().parents[1]


def _subject(flip: bool = False) -> Image.Image:
    pixels = np.full((64, 96, 3), 255, np.uint8)
    pixels[4:28, 6:40] = (220, 30, 30)
    pixels[40:60, 60:90] = (30, 30, 220)
    return Image.fromarray(np.ascontiguousarray(pixels[:, ::-1]) if flip else pixels)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    _subject().save(folder / "front.png")
    _subject(flip=True).save(folder / "side.jpg", quality=95)
    return folder


@pytest.fixture(scope="module")
def trained_ckpt(tiny_models, tmp_path_factory) -> Path:
    """A second checkpoint of the same shapes, stored where training writes them (checkpoint-N/model.bin)."""
    checkpoint = load_ip_adapter_checkpoint(tiny_models.ip_ckpt)
    checkpoint["ip_adapter"] = {key: value * 1.5 for key, value in checkpoint["ip_adapter"].items()}
    path = tmp_path_factory.mktemp("run") / "checkpoint-5" / "model.bin"
    path.parent.mkdir()
    torch.save(checkpoint, path)
    return path


def generate_argv(models, photos: Path | tuple[Path, ...], out: Path, *extra: str, ip_ckpt: tuple[Path, ...] = ()) -> list[str]:
    photos = (photos,) if isinstance(photos, Path) else photos
    return [
        *("--base_model_path", str(models.sdxl_dir), "--image_encoder_path", str(models.image_encoder_dir)),
        *("--ip_ckpt", str(models.ip_ckpt), *map(str, ip_ckpt), "--reference_images", *map(str, photos), "--output_dir", str(out)),
        *("--num_images", "2", "--num_inference_steps", "2", "--height", str(SIZE), "--width", str(SIZE)),
        *extra,
    ]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.fixture(scope="module")
def side_by_side(tiny_models, photos, trained_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("generate") / "out"
    generate.main(generate_argv(tiny_models, photos, out, "--prompts", "a toy on the beach", "a toy in the snow", ip_ckpt=(trained_ckpt,)))
    return out


def test_two_checkpoints_give_images_on_the_same_noise_and_a_sheet_per_prompt(side_by_side, capsys):
    labels = ["0-ip-adapter-plus", "1-checkpoint-5"]
    assert sorted(path.name for path in side_by_side.iterdir()) == sorted([LOCK_NAME, *labels, SHEETS_DIR, "run_config.json"])
    for prompt in ("a toy on the beach", "a toy in the snow"):
        names = [f"{prompt_stem(prompt)}_{index}.png" for index in (0, 1)]
        start, trained = ([pixels(side_by_side / label / name) for name in names] for label in labels)
        assert all(image.shape == (SIZE, SIZE, 3) for image in start + trained)
        assert not np.array_equal(start[0], start[1])  # each image has its own seed
        assert not np.array_equal(start[0], trained[0])  # the checkpoints differ
        sheet = pixels(side_by_side / SHEETS_DIR / f"{prompt_stem(prompt)}.png")
        assert sheet.shape == (2 * SIZE, 2 * SIZE, 3)  # a row per image, a column per checkpoint
        np.testing.assert_array_equal(sheet[SIZE:, SIZE:], trained[1])
    config = json.loads((side_by_side / "run_config.json").read_text())
    assert config["scale"] == 0.78 and config["checkpoint_labels"] == labels and len(config["ip_ckpt_sha256"]) == 2
    assert [Path(photo["path"]).name for photo in config["photos"]] == ["front.png", "side.jpg"]
    assert all(len(photo["sha256"]) == 64 and photo["box"] is None for photo in config["photos"])


def test_the_same_command_resumes_without_redoing(side_by_side, tiny_models, photos, trained_ckpt, capsys):
    argv = generate_argv(tiny_models, photos, side_by_side, "--prompts", "a toy on the beach", "a toy in the snow", ip_ckpt=(trained_ckpt,))
    images = {path: path.stat().st_mtime_ns for path in side_by_side.rglob("*.png") if SHEETS_DIR not in path.parts}
    config = (side_by_side / "run_config.json").read_bytes()
    generate.main(argv)
    assert "8/8 images exist" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in images} == images
    assert (side_by_side / "run_config.json").read_bytes() == config


def test_any_prompt_gets_a_safe_distinct_file_name_inside_the_output_folder(tiny_models, photos, tmp_path):
    prompts = ["../../escape", "a\0b", "x" * 300, "a/b", "a\\b", ".hidden"]
    out = tmp_path / "out"
    generate.main(generate_argv(tiny_models, photos, out, "--num_images", "1", "--num_inference_steps", "1", "--prompts", *prompts))
    made = [path for path in out.rglob("*.png") if SHEETS_DIR not in path.parts]
    assert len(made) == len({path.name for path in made}) == len(prompts)
    assert all(path.parent == out / "0-ip-adapter-plus" and len(path.name.encode()) <= 120 for path in made)
    assert not [path for path in tmp_path.rglob("*") if out not in path.parents and path != out]  # nothing written outside


@pytest.fixture(scope="module")
def ip_model(tiny_models):
    return load_generation_model(tiny_models.sdxl_dir, tiny_models.image_encoder_dir, tiny_models.ip_ckpt, "cpu", torch.float32)


def _tokens(ip_model, path: Path) -> torch.Tensor:
    return ip_model.get_image_embeds([conditioning_images(read_photos([path]))])[0]


def test_photos_as_taken_give_the_tokens_of_the_photo_as_seen(ip_model, tmp_path):
    upright = _subject()
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, displayed upright
    upright.rotate(90, expand=True).save(tmp_path / "phone.png", exif=exif)
    torch.testing.assert_close(_tokens(ip_model, tmp_path / "phone.png"), _tokens(ip_model, tmp_path / "upright.png"), rtol=0, atol=0)

    rgba = np.zeros((64, 96, 4), np.uint8)  # transparent background, black under .convert("RGB")
    subject = np.asarray(upright).min(axis=2) < 255
    rgba[subject, :3], rgba[subject, 3] = np.asarray(upright)[subject], 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    torch.testing.assert_close(_tokens(ip_model, tmp_path / "cutout.png"), _tokens(ip_model, tmp_path / "upright.png"), rtol=0, atol=0)

    gray = np.asarray(upright.convert("L"))
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "scan16.png")
    conditioning = np.asarray(conditioning_images(read_photos([tmp_path / "scan16.png"]))[0])
    assert conditioning.min() < 100 and conditioning.std() > 20  # the subject is there, not a white page


def test_scores_each_checkpoint_against_the_photos(side_by_side, tiny_models, photos, trained_ckpt, tiny_clip_path, tiny_dino_dir, capsys):
    argv = generate_argv(tiny_models, photos, side_by_side, "--prompts", "a toy on the beach", "a toy in the snow", ip_ckpt=(trained_ckpt,))
    generate.main([*argv, "--clip_model", str(tiny_clip_path), "--dino_model", str(tiny_dino_dir)])
    scores = json.loads((side_by_side / generate.SCORES_NAME).read_text())
    assert sorted(scores) == ["0-ip-adapter-plus", "1-checkpoint-5"]
    assert all(set(row) == {"clipt_score", "clipi_score", "dino_score"} and all(np.isfinite(list(row.values()))) for row in scores.values())
    assert "1-checkpoint-5: clipt_score" in capsys.readouterr().out


def test_bad_inputs_are_one_line_before_any_model_loads(tiny_models, photos, tmp_path):
    assert "no prompt" in bad_input_message(generate.main, generate_argv(tiny_models, photos, tmp_path / "a"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no photos" in bad_input_message(generate.main, generate_argv(tiny_models, empty, tmp_path / "b", "--prompts", "x"))
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"front.png": [0, 0, 500, 500]}))
    message = bad_input_message(generate.main, generate_argv(tiny_models, photos, tmp_path / "c", "--prompts", "x", "--boxes", str(boxes)))
    assert "front.png" in message and "not inside" in message
    for flag, value, expected in (("--height", "36", "multiple of 8"), ("--guidance_scale", "nan", "finite")):
        message = bad_input_message(generate.main, generate_argv(tiny_models, photos, tmp_path / "d", "--prompts", "x", flag, value))
        assert flag in message and expected in message
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c", "d"))


def test_every_checkpoint_gets_the_same_noise(tiny_models, photos, tmp_path):
    """The same checkpoint twice gives identical columns: a sheet compares checkpoints, not seeds."""
    out = tmp_path / "out"
    generate.main(generate_argv(tiny_models, photos, out, "--num_images", "1", "--prompts", "a toy", ip_ckpt=(tiny_models.ip_ckpt,)))
    name = f"{prompt_stem('a toy')}_0.png"
    np.testing.assert_array_equal(pixels(out / "0-ip-adapter-plus" / name), pixels(out / "1-ip-adapter-plus" / name))


def _images(out: Path) -> dict[str, np.ndarray]:
    return {str(path.relative_to(out)): pixels(path) for path in sorted(out.glob("*-*/*.png"))}


@pytest.fixture()
def same_names(tmp_path) -> tuple[Path, Path]:
    """Two different photos both called 1.png, in two folders."""
    first, second = tmp_path / "a" / "1.png", tmp_path / "b" / "1.png"
    for path, image in ((first, _subject()), (second, _subject(flip=True))):
        path.parent.mkdir()
        image.save(path)
    return first, second


def test_photos_with_one_name_are_two_photos_and_a_changed_one_makes_the_subject_again(
    tiny_models, same_names, tiny_dino_dir, tmp_path, capsys
):
    first, second = same_names
    out = tmp_path / "out"
    argv = generate_argv(tiny_models, (first, second), out, "--prompts", "a toy", "--num_inference_steps", "1")
    generate.main([*argv, "--prompts", "a toy", "a cat", "--dino_model", str(tiny_dino_dir)])
    before = {name: image for name, image in _images(out).items() if "a cat" not in name}
    _subject().rotate(180).save(first)  # the same file name, another photo
    capsys.readouterr()
    generate.main(argv)
    printed = capsys.readouterr().out
    assert f"{first}: other content" in printed and "making all 2 images again" in printed
    assert not (out / generate.SCORES_NAME).exists() and not list(out.rglob("a cat*"))  # made from the old photo: gone
    fresh = tmp_path / "fresh"
    generate.main([*argv[: argv.index("--output_dir") + 1], str(fresh), *argv[argv.index("--output_dir") + 2 :]])
    after = _images(out)
    assert after.keys() == before.keys() == _images(fresh).keys()
    assert all(np.array_equal(after[name], image) for name, image in _images(fresh).items())  # as made from the new photo
    assert not any(np.array_equal(after[name], image) for name, image in before.items())
    # The same photos elsewhere, under other names: the same subject, nothing is made again.
    moved = tmp_path / "moved"
    moved.mkdir()
    for index, photo in enumerate((first, second)):
        photo.rename(moved / f"{index}.png")
    generate.main(generate_argv(tiny_models, (moved / "0.png", moved / "1.png"), out, "--prompts", "a toy", "--num_inference_steps", "1"))
    assert "2/2 images exist" in capsys.readouterr().out
    assert all(np.array_equal(image, after[name]) for name, image in _images(out).items())


def test_boxes_are_keyed_by_photo_path_and_a_changed_box_makes_the_subject_again(tiny_models, same_names, tmp_path, capsys):
    first, second = same_names
    boxes = tmp_path / "boxes.json"
    out = tmp_path / "out"
    argv = generate_argv(tiny_models, (first, second), out, "--prompts", "a toy", "--num_inference_steps", "1", "--boxes", str(boxes))
    boxes.write_text(json.dumps({"1.png": [0, 0, 48, 32]}))
    message = bad_input_message(generate.main, argv)
    assert "1.png" in message and str(first) in message and str(second) in message and "path" in message
    boxes.write_text(json.dumps({str(first): [0, 0, 48, 32]}))
    generate.main(argv)
    before = _images(out)
    capsys.readouterr()
    boxes.write_text(json.dumps({str(first): [0, 0, 96, 64]}))  # the whole photo: another crop, another subject
    generate.main(argv)
    printed = capsys.readouterr().out
    assert f"{first}: other box" in printed and "making all 2 images again" in printed
    assert not any(np.array_equal(_images(out)[name], image) for name, image in before.items())
    boxes.write_text(json.dumps({str(tmp_path / "c" / "1.png"): [0, 0, 8, 8]}))
    assert "not among --reference_images" in bad_input_message(generate.main, argv)


def test_only_the_metrics_of_the_models_given_are_scored(tiny_models, photos, tiny_dino_dir, tiny_clip_path, tmp_path):
    argv = generate_argv(tiny_models, photos, tmp_path / "out", "--prompts", "a toy", "--num_images", "1", "--num_inference_steps", "1")
    generate.main([*argv, "--dino_model", str(tiny_dino_dir)])  # no CLIP model is needed (nor fetched)
    assert [set(row) for row in json.loads((tmp_path / "out" / generate.SCORES_NAME).read_text()).values()] == [{"dino_score"}]
    generate.main([*argv, "--clip_model", str(tiny_clip_path)])
    assert [set(row) for row in json.loads((tmp_path / "out" / generate.SCORES_NAME).read_text()).values()] == [
        {"clipt_score", "clipi_score"}
    ]


def test_metric_models_are_checked_before_the_first_image(tiny_models, photos, tiny_clip_path, tiny_dino_dir, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((tiny_dino_dir / "config.json").read_text())
    out = tmp_path / "out"
    argv = generate_argv(tiny_models, photos, out, "--prompts", "a toy", "--num_images", "1", "--num_inference_steps", "1")
    for models, culprit in (
        (("--clip_model", str(garbage)), str(garbage)),
        (("--dino_model", str(tmp_path / "no_dino")), "--dino_model"),
        (("--clip_model", str(tiny_clip_path), "--dino_model", str(weightless)), str(weightless)),
    ):
        assert culprit in bad_input_message(generate.main, [*argv, *models])
        assert not out.exists()
    (out / generate.SCORES_NAME).mkdir(parents=True)
    assert generate.SCORES_NAME in bad_input_message(generate.main, [*argv, "--dino_model", str(tiny_dino_dir)])
    assert [path.name for path in out.iterdir()] == [generate.SCORES_NAME]


def test_two_processes_make_a_changed_subject_again_and_stop_together_on_a_bad_metric_model(
    tiny_models, same_names, tiny_dino_dir, tmp_path
):
    """The main process removes the old images before any process writes; a model only the main process loads stops both."""
    first, second = same_names
    out = tmp_path / "out"
    argv = generate_argv(tiny_models, (first, second), out, "--prompts", "a toy", "--num_inference_steps", "1", "--batch_size", "1")
    generate.main(argv)
    _subject().rotate(180).save(first)
    fresh = tmp_path / "fresh"
    generate.main([*argv[: argv.index("--output_dir") + 1], str(fresh), *argv[argv.index("--output_dir") + 2 :]])

    def torchrun(*extra: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(REPO / "generate.py")]
        env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        return subprocess.run([*command, *argv, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    result = torchrun("--dino_model", str(tiny_dino_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("making all 2 images again") == 1 and json.loads((out / generate.SCORES_NAME).read_text())
    assert _images(out).keys() == _images(fresh).keys()
    assert all(np.array_equal(image, _images(fresh)[name]) for name, image in _images(out).items())  # batch 1 both ways: bit-identical
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    result = torchrun("--clip_model", str(garbage))
    assert result.returncode != 0 and "not an OpenAI CLIP checkpoint" in result.stderr, result.stderr[-3000:]
