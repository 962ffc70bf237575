"""SD 1.5 + IP-Adapter-Plus through the same commands as SDXL, on the tiny SD 1.5 stand-ins: construct -> maps
(on SD 1.5's latent grid) -> DreamBench inference (both settings) -> evaluate -> generate. No `--height`/`--width`:
every image is at the model's native size (32 px for the stand-in, whose VAE downsamples 4x)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from base_models.generation import native_image_size
from patch_quality import layout
from tests.kit.flow import (
    compute_quality_maps,
    evaluate_dreambench,
    generate_dreambench_directly,
    generate_your_subject,
    max_pixel_difference,
    model_args,
    pixels,
    run_dreambench_inference,
)
from training_data import construct

NATIVE = 32
STEPS = ("--num_inference_steps", "2")


def test_the_native_size_is_asked_of_the_model(tiny_sd15_dir, tiny_sdxl_dir) -> None:
    assert native_image_size(tiny_sd15_dir) == NATIVE  # unet sample_size 8 x VAE factor 4
    assert native_image_size(tiny_sdxl_dir) == 64  # unet sample_size 32 x VAE factor 2


@pytest.fixture(scope="module")
def pairs(tiny_sd15_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sd15_pairs") / "DATA"
    construct.main([*model_args(tiny_sd15_models), "--output_dir", str(out), "--num_samples", "2", "--num_generated", "1", *STEPS])
    return out


def test_construct_draws_pairs_at_the_native_size(pairs) -> None:
    manifest = json.loads((pairs / layout.MANIFEST_NAME).read_text())
    assert manifest["complete"] is True and (manifest["settings"]["height"], manifest["settings"]["width"]) == (NATIVE, NATIVE)
    for folder in layout.list_samples(pairs):
        _, reference, generated = layout.sample_files(folder)
        assert Image.open(reference).size == Image.open(generated[0]).size == (NATIVE, NATIVE)
        assert not np.array_equal(pixels(reference), pixels(generated[0]))


def test_maps_live_on_the_sd15_latent_grid(pairs, tiny_sd15_dir, tiny_dinov2_dir) -> None:
    stored = compute_quality_maps(pairs, tiny_sd15_dir, tiny_dinov2_dir)
    assert stored.metadata["vae_scale_factor"] == "4"  # the SDXL stand-in's is 2: the grid comes from the model given
    assert stored.get("sample0", 0)[0].shape == stored.get("sample1", 0)[1].shape == (16, 16)


@pytest.mark.parametrize("kosmosg", [False, True])
def test_dreambench_inference_and_evaluation(tiny_sd15_models, tiny_clip_path, tiny_dino_dir, tmp_path, kosmosg) -> None:
    out = tmp_path / "out"
    prompts, written = run_dreambench_inference(tiny_sd15_models, out, kosmosg, *STEPS)
    assert all(image.shape == (NATIVE, NATIVE, 3) for image in written)

    # The same items generated directly by the SD 1.5 wrapper: the script ran SD 1.5 with the adapter and the setting's references.
    direct = generate_dreambench_directly(tiny_sd15_models, prompts, kosmosg, guidance_scale=5.0)
    assert max_pixel_difference(direct, written) <= 2

    scores = evaluate_dreambench(out, tiny_clip_path, tiny_dino_dir)
    assert json.loads((out / "all_score.json").read_text()) == scores
    assert all(np.isfinite(scores[name]) for name in ("clipi_score", "clipt_score", "dino_score"))


def test_generate_your_subject(tiny_sd15_models, tmp_path) -> None:
    images = generate_your_subject(tiny_sd15_models, tmp_path, *STEPS)
    assert len(images) == 2 and all(pixels(path).shape == (NATIVE, NATIVE, 3) for path in images)
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))
