"""FLUX.1 + XLabs' IP-Adapter through the same commands as SDXL, on the tiny FLUX.1-dev stand-ins: construct -> maps (on
FLUX's 8 px VAE grid, before the 2x2 packing) -> DreamBench inference (both settings) -> evaluate -> generate.

The images are 64 px (`--height/--width`): FLUX's native 1024 px is too slow for a CPU test. Steps and guidance are left to
the family where a test checks them (28 steps and embedded guidance 3.5, `FluxPipeline`'s defaults)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from diffusers import FluxPipeline
from PIL import Image

from base_models import family_of
from base_models.generation import with_model_defaults
from common.errors import BadInputError
from ip_adapter.batch_generation import GenerationItem, SubjectTokens, generate_batch
from patch_quality import layout
from tests.kit.flow import (
    compute_quality_maps,
    evaluate_dreambench,
    generate_dreambench_directly,
    generate_your_subject,
    load_on_cpu,
    max_pixel_difference,
    model_args,
    pixels,
    run_dreambench_inference,
)
from tests.kit.flux import *  # noqa: F401,F403
from training_data import construct
from training_data.cli import construct_config

SIZE = 64
STEPS = ("--num_inference_steps", "2")
IMAGE_SIZE = ("--height", str(SIZE), "--width", str(SIZE))


def test_sampling_defaults_are_the_familys(tiny_flux_models, tiny_sdxl_dir) -> None:
    given = construct_config([*model_args(tiny_flux_models), "--output_dir", "x", "--num_samples", "1"])
    flux = with_model_defaults(given)
    assert (flux.num_inference_steps, flux.guidance_scale, flux.height) == (28, 3.5, 1024)
    called = inspect.signature(FluxPipeline.__call__).parameters  # the values named in --help are the library's
    assert (called["num_inference_steps"].default, called["guidance_scale"].default) == (28, 3.5)
    sdxl = with_model_defaults(
        construct_config(["--base_model_path", str(tiny_sdxl_dir), *model_args(tiny_flux_models)[2:], "--output_dir", "x"])
    )
    assert (sdxl.num_inference_steps, sdxl.guidance_scale) == (30, 5.0)  # the paper's, unchanged
    assert with_model_defaults(construct_config([*model_args(tiny_flux_models), "--output_dir", "x", *STEPS])).num_inference_steps == 2


def test_an_image_size_flux_cannot_pack_is_refused(tiny_flux_models, tiny_sdxl_dir) -> None:
    """72 px is 9 latent cells: FluxPipeline would quietly make 64 px images, so the scripts refuse it before any model loads."""
    given = [*model_args(tiny_flux_models), "--output_dir", "x", "--height", "72", "--width", "64"]
    with pytest.raises(BadInputError, match="--height 72: a FLUX.1 model generates at multiples of 16 px"):
        with_model_defaults(construct_config(given))
    assert with_model_defaults(construct_config(["--base_model_path", str(tiny_sdxl_dir), *given[2:]])).height == 72


@pytest.fixture(scope="module")
def pairs(tiny_flux_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flux_pairs") / "DATA"
    construct.main(
        [*model_args(tiny_flux_models), "--output_dir", str(out), "--num_samples", "2", "--num_generated", "1", *STEPS, *IMAGE_SIZE]
    )
    return out


def test_construct_draws_pairs_with_flux_and_its_adapter(pairs, tiny_flux_models) -> None:
    manifest = json.loads((pairs / layout.MANIFEST_NAME).read_text())
    assert manifest["complete"] is True and manifest["settings"]["guidance_scale"] == 3.5
    sample = manifest["samples"][0]
    reference, generated = pairs / sample["folder"] / sample["reference"], pairs / sample["folder"] / sample["generated"][0]
    assert Image.open(reference).size == Image.open(generated).size == (SIZE, SIZE)
    assert not np.array_equal(pixels(reference), pixels(generated))

    # The generated images are FLUX + the XLabs adapter conditioned on each sample's reference, at the item's seed (one batch,
    # as construct drew them).
    model = load_on_cpu(tiny_flux_models)
    tokens = SubjectTokens(model, lambda folder: [Image.open(pairs / folder / by_folder[folder]["reference"]).convert("RGB")])
    by_folder = {entry["folder"]: entry for entry in manifest["samples"]}
    items = [GenerationItem(entry["folder"], entry["prompt"], entry["generated_seeds"][0]) for entry in manifest["samples"]]
    direct = generate_batch(model, tokens, items, 2, scale=manifest["settings"]["scale"], guidance_scale=3.5, height=SIZE, width=SIZE)
    for image, entry in zip(direct, manifest["samples"]):
        written = pixels(pairs / entry["folder"] / entry["generated"][0])
        assert int(np.abs(np.asarray(image, dtype=np.int16) - written).max()) <= 2


def test_maps_live_on_flux_latent_grid(pairs, tiny_flux_dir, tiny_dinov2_dir) -> None:
    stored = compute_quality_maps(pairs, tiny_flux_dir, tiny_dinov2_dir)
    assert stored.metadata["vae_scale_factor"] == "8"  # FLUX's VAE stride: one value per latent position, before packing
    assert stored.get("sample0", 0)[0].shape == stored.get("sample1", 0)[1].shape == (8, 8)


@pytest.mark.parametrize("kosmosg", [False, True])
def test_dreambench_inference_and_evaluation(tiny_flux_models, tiny_clip_path, tiny_dino_dir, tmp_path, kosmosg) -> None:
    out = tmp_path / "out"
    prompts, written = run_dreambench_inference(tiny_flux_models, out, kosmosg, *STEPS, *IMAGE_SIZE)
    assert all(image.shape == (SIZE, SIZE, 3) for image in written)

    # The same items generated directly by the FLUX wrapper at FLUX.1-dev's embedded guidance: the script ran FLUX with the
    # adapter, the setting's references and the family's default guidance.
    direct = generate_dreambench_directly(tiny_flux_models, prompts, kosmosg, guidance_scale=3.5, height=SIZE, width=SIZE)
    assert max_pixel_difference(direct, written) <= 2

    scores = evaluate_dreambench(out, tiny_clip_path, tiny_dino_dir)
    assert json.loads((out / "all_score.json").read_text()) == scores
    assert all(np.isfinite(scores[name]) for name in ("clipi_score", "clipt_score", "dino_score"))


def test_generate_your_subject(tiny_flux_models, tmp_path) -> None:
    images = generate_your_subject(tiny_flux_models, tmp_path, *STEPS, *IMAGE_SIZE)
    assert len(images) == 2 and all(pixels(path).shape == (SIZE, SIZE, 3) for path in images)
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))
    assert family_of(tiny_flux_models.flux_dir).name == "FLUX.1"
