"""SD 1.5 + IP-Adapter-Plus through the same commands as SDXL, on the tiny SD 1.5 stand-ins: construct -> maps
(on SD 1.5's latent grid) -> DreamBench inference (both settings) -> evaluate -> generate. No `--height`/`--width`:
every image is at the model's native size (32 px for the stand-in, whose VAE downsamples 4x)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate_dreambooth
import generate
import inference_dreambooth
from base_models.generation import load_generation_model, native_image_size
from dreambench.benchmark import prompts_for
from dreambench.config import DEFAULT_SCALES
from dreambench.data import load_conditioning_images
from dreambench.generation import build_items, image_path
from ip_adapter.batch_generation import SubjectTokens, generate_batch
from patch_quality import layout, maps
from patch_quality.store import QualityMaps
from tests.kit.dreambench import DREAMBENCH_ROOT
from training_data import construct

NATIVE = 32
SUBJECT = "backpack"
STEPS = ("--num_inference_steps", "2")


def _models(paths) -> list[str]:
    return ["--base_model_path", str(paths.sd15_dir), "--image_encoder_path", str(paths.image_encoder_dir), "--ip_ckpt", str(paths.ip_ckpt)]


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_the_native_size_is_asked_of_the_model(tiny_sd15_dir, tiny_sdxl_dir) -> None:
    assert native_image_size(tiny_sd15_dir) == NATIVE  # unet sample_size 8 x VAE factor 4
    assert native_image_size(tiny_sdxl_dir) == 64  # unet sample_size 32 x VAE factor 2


@pytest.fixture(scope="module")
def pairs(tiny_sd15_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sd15_pairs") / "DATA"
    construct.main([*_models(tiny_sd15_models), "--output_dir", str(out), "--num_samples", "2", "--num_generated", "1", *STEPS])
    return out


def test_construct_draws_pairs_at_the_native_size(pairs) -> None:
    manifest = json.loads((pairs / layout.MANIFEST_NAME).read_text())
    assert manifest["complete"] is True and (manifest["settings"]["height"], manifest["settings"]["width"]) == (NATIVE, NATIVE)
    for folder in layout.list_samples(pairs):
        _, reference, generated = layout.sample_files(folder)
        assert Image.open(reference).size == Image.open(generated[0]).size == (NATIVE, NATIVE)
        assert not np.array_equal(_pixels(reference), _pixels(generated[0]))


def test_maps_live_on_the_sd15_latent_grid(pairs, tiny_sd15_dir, tiny_dinov2_dir) -> None:
    quality = pairs / "patch_quality.safetensors"
    maps.main(
        ["--data_root", str(pairs), "--backbone", str(tiny_dinov2_dir), "--cpu", "--resolution", "64"]
        + ["--base_model_path", str(tiny_sd15_dir), "--output", str(quality)]
    )
    stored = QualityMaps.load(quality)
    assert stored.metadata["vae_scale_factor"] == "4"  # the SDXL stand-in's is 2: the grid comes from the model given
    assert stored.get("sample0", 0)[0].shape == stored.get("sample1", 0)[1].shape == (16, 16)


@pytest.mark.parametrize("kosmosg", [False, True])
def test_dreambench_inference_and_evaluation(tiny_sd15_models, tiny_clip_path, tiny_dino_dir, tmp_path, kosmosg) -> None:
    out = tmp_path / "out"
    inference_dreambooth.main(
        [*_models(tiny_sd15_models), "--data_root", str(DREAMBENCH_ROOT), "--output_dir", str(out), "--subjects", SUBJECT]
        + ["--prompts_per_subject", "2", "--is_kosmosg", str(kosmosg), *STEPS]
    )
    prompts = prompts_for(SUBJECT)[:2]
    written = [_pixels(image_path(out, SUBJECT, prompt)) for prompt in prompts]
    assert all(pixels.shape == (NATIVE, NATIVE, 3) for pixels in written)

    # The same items generated directly by the SD 1.5 wrapper: the script ran SD 1.5 with the adapter and the setting's references.
    model = load_generation_model(
        tiny_sd15_models.sd15_dir, tiny_sd15_models.image_encoder_dir, tiny_sd15_models.ip_ckpt, "cpu", torch.float32
    )
    tokens = SubjectTokens(model, lambda subject: load_conditioning_images(DREAMBENCH_ROOT, subject, kosmosg))
    scale = DEFAULT_SCALES[kosmosg]
    direct = generate_batch(model, tokens, build_items({SUBJECT: prompts}, 42), 2, scale=scale, guidance_scale=5.0)
    assert max(int(np.abs(np.asarray(image, dtype=np.int16) - pixels).max()) for image, pixels in zip(direct, written)) <= 2

    scores = evaluate_dreambooth.main(
        [
            "--output_dir",
            str(out),
            "--data_root",
            str(DREAMBENCH_ROOT),
            "--clip_model",
            str(tiny_clip_path),
            "--dino_model",
            str(tiny_dino_dir),
        ]
    )
    assert json.loads((out / "all_score.json").read_text()) == scores
    assert all(np.isfinite(scores[name]) for name in ("clipi_score", "clipt_score", "dino_score"))


def test_generate_your_subject(tiny_sd15_models, tmp_path) -> None:
    photos = tmp_path / "photos"
    for index, photo in enumerate(load_conditioning_images(DREAMBENCH_ROOT, SUBJECT, kosmosg=False)[:2]):
        photos.mkdir(exist_ok=True)
        photo.save(photos / f"{index}.png")
    out = tmp_path / "out"
    generate.main(
        [*_models(tiny_sd15_models), "--reference_images", str(photos), "--output_dir", str(out)]
        + ["--prompts", "a backpack on the beach", "--num_images", "2", *STEPS]
    )
    images = sorted(out.rglob("*_[01].png"))
    assert len(images) == 2 and all(_pixels(path).shape == (NATIVE, NATIVE, 3) for path in images)
    assert not np.array_equal(_pixels(images[0]), _pixels(images[1]))
