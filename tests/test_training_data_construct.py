"""Training-pair construction on the tiny SDXL + IP-Adapter-Plus: layout, manifest, seeds, resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.run_lock import LOCK_NAME
from patch_quality import layout
from tests.kit.cli import bad_input_message
from tests.kit.dreambench import dreambench_dataset
from training_data.categories import OBJECT_CATEGORIES, SCENE_TEMPLATES, load_categories, with_article
from training_data.construct import main, plan_samples

# Class words the official evaluation fills into DreamBench prompts.
DREAMBENCH_CLASSES = {
    "backpack",
    "stuffed",
    "animal",
    "bowl",
    "can",
    "candle",
    "clock",
    "sneaker",
    "toy",
    "boot",
    "glasses",
    "cartoon",
    "teapot",
    "vase",
    "cat",
    "dog",
}


def test_categories_avoid_dreambench_subjects_and_make_valid_prompts():
    subjects = [p.name for p in dreambench_dataset().iterdir() if p.is_dir()]
    assert len(subjects) == 30
    banned = set(DREAMBENCH_CLASSES) | {word for subject in subjects for word in re.split(r"[_\d]+", subject) if word}
    for category in OBJECT_CATEGORIES:
        words = set(category.lower().split())
        assert not words & banned, f"{category!r} overlaps DreamBench ({words & banned})"
    assert len(set(OBJECT_CATEGORIES)) == len(OBJECT_CATEGORIES) >= 150
    for template in SCENE_TEMPLATES:
        for category in OBJECT_CATEGORIES:
            layout.check_prompt(template.format(object=with_article(category)))


def test_plan_is_deterministic_and_seeds_are_distinct():
    plans = plan_samples(6, 3, seed=42, categories=OBJECT_CATEGORIES)
    assert plans == plan_samples(6, 3, seed=42, categories=OBJECT_CATEGORIES)
    assert plans != plan_samples(6, 3, seed=43, categories=OBJECT_CATEGORIES)
    assert [plan.object for plan in plans] == list(OBJECT_CATEGORIES[:6])
    assert plans[0].reference_prompt == "a photo of a coffee mug, plain white background"
    seeds = [plan.reference_seed for plan in plans] + [s for plan in plans for s in plan.generated_seeds]
    assert len(set(seeds)) == len(seeds)
    # Seeds depend on (sample, k) only, not on how many samples are planned.
    assert plan_samples(2, 3, seed=42, categories=OBJECT_CATEGORIES) == plans[:2]


def test_load_categories_file(tmp_path):
    path = tmp_path / "objects.txt"
    path.write_text("# mine\nlamp\n\nkite\n")
    assert load_categories(path) == ("lamp", "kite")
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="lists no categories"):
        load_categories(path)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


def test_construct_writes_layout_manifest_and_resumes(tmp_path, tiny_models):
    out = tmp_path / "DATA"
    args = [
        "--base_model_path",
        str(tiny_models.sdxl_dir),
        "--image_encoder_path",
        str(tiny_models.image_encoder_dir),
        "--ip_ckpt",
        str(tiny_models.ip_ckpt),
        "--output_dir",
        str(out),
        "--num_samples",
        "2",
        "--num_generated",
        "2",
        "--num_inference_steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--batch_size",
        "3",
    ]
    main(args)

    samples = layout.list_samples(out)
    assert [p.name for p in samples] == ["sample0", "sample1"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["settings"]["ip_ckpt_sha256"]
    for folder, record in zip(samples, manifest["samples"]):
        prompt, reference, generated = layout.sample_files(folder)
        assert prompt == record["prompt"] and reference.name == record["reference"]
        assert [p.name for p in generated.values()] == record["generated"] and list(generated) == [0, 1]
        assert Image.open(reference).size == (32, 32)
    first = {p: _pixels(p) for p in sorted(out.rglob("*.png"))}
    assert len(first) == 6
    # Different seeds per (sample, k): the two generated images of a sample differ.
    _, _, generated = layout.sample_files(samples[0])
    assert not np.array_equal(first[generated[0]], first[generated[1]])

    # Resume after losing one reference and one generated image: only those are made again, and
    # identically (their seeds do not depend on what else is generated or on the batch).
    _, reference, generated = layout.sample_files(samples[1])
    reference.unlink()
    generated[1].unlink()
    kept = samples[0] / next(p.name for p in samples[0].iterdir())
    kept_mtime = kept.stat().st_mtime_ns
    main(args[:-2] + ["--batch_size", "1"])
    assert kept.stat().st_mtime_ns == kept_mtime
    for path, pixels in first.items():
        np.testing.assert_array_equal(_pixels(path), pixels)
    assert [path.name for path in out.rglob(".*")] == [LOCK_NAME]  # no temporary files left; the lock of the folder's owner

    assert re.search("other settings .*seed", bad_input_message(main, args + ["--seed", "7"]))


def test_given_reference_images_become_the_samples(tmp_path, tiny_models):
    photos = []
    for index, (color, category) in enumerate([("red", "lamp"), ("blue", "kite"), ("green", "lamp")]):
        Image.new("RGB", (80, 64), color).save(tmp_path / f"p{index}.png")
        photos.append({"image": str(tmp_path / f"p{index}.png"), "category": category})
    listing = tmp_path / "refs.json"
    listing.write_text(json.dumps(photos))
    out = tmp_path / "DATA"
    base = [
        "--base_model_path",
        str(tiny_models.sdxl_dir),
        "--image_encoder_path",
        str(tiny_models.image_encoder_dir),
        "--ip_ckpt",
        str(tiny_models.ip_ckpt),
        "--output_dir",
        str(out),
        "--num_inference_steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
    ]
    main(base + ["--reference_images", str(listing)])
    samples = layout.list_samples(out)
    assert len(samples) == 3
    for folder, photo in zip(samples, photos):
        prompt, reference, generated = layout.sample_files(folder)
        assert photo["category"] in prompt and list(generated) == [0]
        np.testing.assert_array_equal(_pixels(reference), _pixels(Path(photo["image"])))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["reference_images"]["sha256"]

    error = bad_input_message(
        main, base + ["--reference_images", str(listing), "--num_samples", "2", "--output_dir", str(tmp_path / "other")]
    )
    assert "disagrees with the 3 images" in error
    listing.write_text(json.dumps([{"image": str(tmp_path / "missing.png"), "category": "lamp"}]))
    assert "missing.png" in bad_input_message(main, base + ["--reference_images", str(listing), "--output_dir", str(tmp_path / "third")])


def _subject_on_white(flip: bool = False) -> Image.Image:
    """A 96x64 photo whose orientation shows: a red block top-left and a blue block bottom-right on white."""
    pixels = np.full((64, 96, 3), 255, np.uint8)
    pixels[4:28, 6:40] = (220, 30, 30)
    pixels[40:60, 60:90] = (30, 30, 220)
    return Image.fromarray(pixels[:, ::-1] if flip else pixels)


def test_photos_are_stored_as_a_person_sees_them_and_a_changed_photo_is_rebuilt(tmp_path, tiny_models, capsys):
    upright = _subject_on_white()
    exif = Image.Exif()
    exif[0x0112] = 6  # phone JPEG: pixels stored sideways, "rotate 90 degrees clockwise to display"
    upright.rotate(90, expand=True).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    rgba = np.zeros((64, 96, 4), np.uint8)  # a cut-out: transparent pixels are (0, 0, 0, 0), black under .convert("RGB")
    subject = np.asarray(upright).min(axis=2) < 255
    rgba[subject] = np.concatenate([np.asarray(upright)[subject], np.full((subject.sum(), 1), 255, np.uint8)], axis=1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    gray = upright.convert("L")
    Image.fromarray(np.asarray(gray).astype(np.uint16) * 257).save(tmp_path / "scan16.png")  # 16-bit grayscale: pure white before
    photos = [{"image": str(tmp_path / name), "category": "toy"} for name in ("phone.jpg", "cutout.png", "scan16.png")]
    listing = tmp_path / "photos.json"
    listing.write_text(json.dumps(photos))
    out = tmp_path / "DATA"
    argv = [
        *("--base_model_path", str(tiny_models.sdxl_dir), "--image_encoder_path", str(tiny_models.image_encoder_dir)),
        *("--ip_ckpt", str(tiny_models.ip_ckpt), "--output_dir", str(out), "--reference_images", str(listing)),
        *("--num_inference_steps", "2", "--height", "32", "--width", "32"),
    ]
    main(argv)
    references = [layout.sample_files(folder)[1] for folder in layout.list_samples(out)]
    phone, cutout, scan = (_pixels(path) for path in references)
    assert phone.shape == (64, 96, 3) and np.abs(phone - np.asarray(upright, np.int16)).mean() < 3  # upright, up to JPEG loss
    np.testing.assert_array_equal(cutout, np.asarray(upright))  # on white
    np.testing.assert_array_equal(scan, np.asarray(gray.convert("RGB")))  # its content, scaled 65535 -> 255

    # Replacing one photo and rerunning rebuilds that sample only.
    capsys.readouterr()
    kept = {path: path.stat().st_mtime_ns for folder in ("sample0", "sample2") for path in (out / folder).iterdir()}
    Image.fromarray(np.asarray(_subject_on_white(flip=True))).save(tmp_path / "cutout.png")
    main(argv)
    assert "the photo of sample1 changed" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in kept} == kept
    np.testing.assert_array_equal(_pixels(references[1]), np.asarray(_subject_on_white(flip=True)))
    assert len(list((out / "sample1").glob("*_gen_0.png"))) == 1


def test_an_unreadable_or_tiny_photo_is_one_line_before_any_model_loads(tmp_path, tiny_models):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    Image.new("RGB", (40, 30), "red").save(tmp_path / "icon.png")
    for name, expected in (("broken.jpg", "unreadable photo"), ("icon.png", "40x30 pixels, expected a photo at least 64")):
        listing = tmp_path / "photos.json"
        listing.write_text(json.dumps([{"image": str(tmp_path / name), "category": "toy"}]))
        argv = ["--base_model_path", str(tiny_models.sdxl_dir), "--image_encoder_path", str(tiny_models.image_encoder_dir)]
        argv += ["--ip_ckpt", str(tiny_models.ip_ckpt), "--output_dir", str(tmp_path / "DATA"), "--reference_images", str(listing)]
        message = bad_input_message(main, argv)
        assert name in message and expected in message
        assert not (tmp_path / "DATA").exists()


@pytest.mark.parametrize(("flag", "value", "expected"), [("--height", "36", "multiple of 8"), ("--guidance_scale", "inf", "finite")])
def test_sampling_flags_the_pipeline_would_refuse_are_one_line_before_any_model_loads(tmp_path, tiny_models, flag, value, expected):
    argv = ["--base_model_path", str(tiny_models.sdxl_dir), "--image_encoder_path", str(tiny_models.image_encoder_dir)]
    argv += ["--ip_ckpt", str(tiny_models.ip_ckpt), "--output_dir", str(tmp_path / "DATA"), "--num_samples", "1", flag, value]
    message = bad_input_message(main, argv)
    assert flag in message and expected in message
    assert not (tmp_path / "DATA").exists()


@pytest.fixture(scope="module")
def constructed(tiny_models, tmp_path_factory) -> list[str]:
    """The argv of a finished tiny run (2 samples x 2 generated images), whose folder later commands try to resume."""
    argv = [
        *("--base_model_path", str(tiny_models.sdxl_dir), "--image_encoder_path", str(tiny_models.image_encoder_dir)),
        *("--ip_ckpt", str(tiny_models.ip_ckpt), "--output_dir", str(tmp_path_factory.mktemp("resume") / "DATA")),
        *("--num_samples", "2", "--num_generated", "2", "--num_inference_steps", "1", "--height", "32", "--width", "32"),
    ]
    main(argv)
    return argv


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--num_generated", "1", "--num_generated: recorded 2, now 1"),
        ("--num_samples", "3", "--num_samples: recorded 2, now 3"),
        ("--seed", "7", "--seed: recorded 42, now 7"),
        ("--scale", "0.5", "--scale: recorded 0.78, now 0.5"),
        ("--negative_prompt", "blurry", "--negative_prompt: recorded"),
        ("--reference_template", "a studio photo of {object}", "--reference_template: sample0's reference prompt recorded"),
        ("--categories", "CATEGORIES", "--categories: sample0's object recorded"),
        ("--dtype", "bfloat16", "--dtype (or accelerate's mixed precision): recorded 'float32', now 'bfloat16'"),
    ],
)
def test_a_resume_with_another_setting_names_its_flag_the_recorded_and_the_new_value(constructed, tmp_path, flag, value, expected):
    if value == "CATEGORIES":
        value = str(tmp_path / "categories.txt")
        Path(value).write_text("lamp\nkite\n")
    message = bad_input_message(main, [*constructed, flag, value])
    assert expected in message and message.endswith("rerun with the recorded settings or use a new --output_dir"), message
    assert message.count(", now ") == 1, message  # that one difference, not its consequences
