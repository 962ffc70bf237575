"""The DreamBench loader: validation of the real folder, reference and conditioning images, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

from common.errors import BadInputError
from dreambench.benchmark import SUBJECTS, get_subject
from dreambench.data import (
    load_conditioning_images,
    load_reference_images,
    reference_photos,
    scaled_box,
    subject_photos,
    validate_dreambench,
)

DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "dreambench"


def _official_box(json_path: Path, width: int) -> np.ndarray:
    """The reference code's box scaling: integer box, then `/ 800 * width`, truncated."""
    box = np.array(json.loads(json_path.read_text())["mask"][1]["box"]).astype(np.int32)
    return (np.array(box) / 800 * width).astype(np.int32)


def _official_conditioning(image_path: Path, json_path: Path) -> Image.Image:
    """The reference code's crop + resize + pad, written out step by step."""
    image = Image.open(image_path)
    box = _official_box(json_path, image.size[0])
    crop = image.crop((box[0], box[1], box[2], box[3]))
    aspect = crop.width / crop.height
    if aspect > 1.0:
        new_w, new_h = 224, int(224 / aspect)
    else:
        new_w, new_h = int(224 * aspect), 224
    left, top = (224 - new_w) // 2, (224 - new_h) // 2
    return transforms.Compose(
        [
            transforms.Resize((new_h, new_w)),
            transforms.Pad((left, top, 224 - new_w - left, 224 - new_h - top), fill=255),
        ]
    )(crop)


def test_real_dreambench_validates():
    validate_dreambench(DREAMBENCH)
    for subject in SUBJECTS:
        photos = subject_photos(DREAMBENCH, subject)
        jpgs = sorted((DREAMBENCH / "dataset" / subject.name).glob("*.jpg"))
        assert [p.path for p in photos] == jpgs
        assert [p.json_path.stem for p in photos] == [p.stem for p in jpgs]


@pytest.mark.parametrize("kosmosg", [False, True])
def test_reference_images_are_full_uncropped_photos(kosmosg):
    images = load_reference_images(DREAMBENCH, "red_cartoon", kosmosg)
    folder = DREAMBENCH / "dataset" / "red_cartoon"
    paths = [folder / "00.jpg"] if kosmosg else sorted(folder.glob("*.jpg"))
    assert len(images) == len(paths)
    for image, path in zip(images, paths):
        expected = Image.open(path).convert("RGB")
        assert image.mode == "RGB" and image.size == expected.size
        assert np.array_equal(np.asarray(image), np.asarray(expected))


@pytest.mark.parametrize(("subject", "kosmosg"), [("backpack", False), ("duck_toy", False), ("dog3", True)])
def test_conditioning_images_match_reference_crop_resize_pad(subject, kosmosg):
    images = load_conditioning_images(DREAMBENCH, subject, kosmosg)
    if kosmosg:
        stems = [get_subject(subject).kosmosg_image]
    else:
        stems = [p.path.stem for p in subject_photos(DREAMBENCH, subject)]
    assert len(images) == len(stems)
    for image, stem in zip(images, stems):
        expected = _official_conditioning(
            DREAMBENCH / "dataset" / subject / f"{stem}.jpg", DREAMBENCH / "json_data" / subject / f"{stem}.json"
        )
        assert image.size == (224, 224) and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_box_scaling_matches_reference_on_every_photo_of_every_subject():
    checked = []
    for subject in SUBJECTS:
        for photo in subject_photos(DREAMBENCH, subject):
            with Image.open(photo.path) as image:
                width = image.size[0]
            assert list(scaled_box(photo.box, width)) == _official_box(photo.json_path, width).tolist(), photo.path
            checked.append(photo.path.relative_to(DREAMBENCH / "dataset").as_posix())
    assert len(checked) == 158 and len({path.split("/")[0] for path in checked}) == 30
    # the two photos where multiplying before dividing moves an edge by one pixel are among them
    assert {"backpack_dog/04.jpg", "robot_toy/04.jpg"} <= set(checked)


def test_conditioning_pads_with_white():
    # backpack/00's box is taller than wide: the left and right margins are padding.
    image = np.asarray(load_conditioning_images(DREAMBENCH, "backpack", False)[0])
    assert (image[:, 0] == 255).all() and (image[:, -1] == 255).all()
    assert not (image[:, 112] == 255).all()


@pytest.fixture()
def fake_root(tmp_path: Path) -> Path:
    """A DreamBench-shaped folder with small generated photos (boxes in 800-wide coordinates)."""
    root = tmp_path / "dreambench"
    for subject in SUBJECTS:
        (root / "dataset" / subject.name).mkdir(parents=True)
        (root / "json_data" / subject.name).mkdir(parents=True)
        for stem in sorted({"00", "01", subject.kosmosg_image}):
            Image.new("RGB", (80, 80), (10, 20, 30)).save(root / "dataset" / subject.name / f"{stem}.jpg")
            box = {"mask": [{"value": 0}, {"value": 1, "box": [100.5, 200.2, 600.9, 700.0]}]}
            (root / "json_data" / subject.name / f"{stem}.json").write_text(json.dumps(box))
    return root


def _one_line_error(exc_info, *fragments: str) -> None:
    message = str(exc_info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_fake_root_is_valid_and_box_is_scaled(fake_root):
    validate_dreambench(fake_root)
    (crop,) = load_conditioning_images(fake_root, "can", True)
    assert crop.size == (224, 224)
    assert [p.box for p in reference_photos(fake_root, "can", True)] == [(100.5, 200.2, 600.9, 700.0)]


def test_missing_subject_folder(fake_root):
    shutil.rmtree(fake_root / "dataset" / "dog5")
    with pytest.raises(BadInputError) as info:
        validate_dreambench(fake_root)
    _one_line_error(info, str(fake_root / "dataset" / "dog5"), "dog5")


def test_missing_root(tmp_path):
    with pytest.raises(BadInputError) as info:
        validate_dreambench(tmp_path / "nowhere")
    _one_line_error(info, str(tmp_path / "nowhere"))


def test_image_without_box_file(fake_root):
    (fake_root / "json_data" / "cat" / "01.json").unlink()
    with pytest.raises(BadInputError) as info:
        validate_dreambench(fake_root)
    _one_line_error(info, str(fake_root / "json_data" / "cat" / "01.json"))


def test_box_file_without_image(fake_root):
    (fake_root / "dataset" / "cat" / "01.jpg").unlink()
    with pytest.raises(BadInputError) as info:
        subject_photos(fake_root, "cat")
    _one_line_error(info, str(fake_root / "dataset" / "cat" / "01.jpg"), "01.json")


def test_missing_kosmosg_image(fake_root):
    subject = get_subject("dog3")  # Kosmos-G image 05
    (fake_root / "dataset" / "dog3" / "05.jpg").unlink()
    (fake_root / "json_data" / "dog3" / "05.json").unlink()
    with pytest.raises(BadInputError) as info:
        reference_photos(fake_root, subject, kosmosg=False)
    _one_line_error(info, "05.jpg", "Kosmos-G")


@pytest.mark.parametrize("content", ["not json", '{"mask": [{"value": 0}]}', '{"mask": [{}, {"box": [1, 2, 3]}]}'])
def test_malformed_box_file(fake_root, content):
    path = fake_root / "json_data" / "vase" / "00.json"
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        subject_photos(fake_root, "vase")
    _one_line_error(info, str(path), "mask[1].box")


def test_box_that_vanishes_after_scaling(fake_root):
    path = fake_root / "json_data" / "vase" / "00.json"
    path.write_text(json.dumps({"mask": [{}, {"box": [10.0, 10.0, 12.0, 12.0]}]}))  # 2 px at 800 -> 0 px at 80
    with pytest.raises(ValueError) as info:
        load_conditioning_images(fake_root, "vase", False)
    _one_line_error(info, str(path), "empty")


@pytest.mark.parametrize("data", [b"not an image", None])
def test_unreadable_image(fake_root, data):
    path = fake_root / "dataset" / "teapot" / "01.jpg"
    if data is None:  # a truncated JPEG: the header opens, the pixels do not decode
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        data = path.read_bytes()[:300]
    path.write_bytes(data)
    for loader in (load_reference_images, load_conditioning_images):
        with pytest.raises(ValueError) as info:
            loader(fake_root, "teapot", False)
        _one_line_error(info, str(path), "unreadable image")
