"""The FLUX generation wrapper (`ip_adapter.flux_generation.FluxIPAdapter`) on the tiny FLUX.1-dev stand-ins: it is what
`FluxFamily.ip_adapter_class()` names, and its images are those of diffusers' `FluxPipeline.load_ip_adapter` + a
pipeline call at the same seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

from base_models import family_of
from base_models.generation import load_generation_model, native_image_size
from common.errors import BadInputError
from ip_adapter.flux_generation import FluxIPAdapter
from stand_ins.flux import TINY, save_image_encoder
from tests.kit.flux import *  # noqa: F401,F403

PROMPT = "a photo of a dog on the beach"
SIZE = dict(height=64, width=64)
#: Both run the same modules in float32 on the same inputs; measured 0.0 (images as float arrays in [0, 1]).
IMAGE_TOLERANCE = 1e-6


def _references() -> list[Image.Image]:
    state = np.random.RandomState(0)
    return [Image.fromarray((state.rand(64, 64, 3) * 255).astype(np.uint8)) for _ in range(2)]


def _ours(models, reference: list[Image.Image], scale: float, seed: int = 0) -> np.ndarray:
    model = load_generation_model(models.flux_dir, models.image_encoder_dir, models.ip_ckpt, "cpu", torch.float32)
    cond, uncond = model.get_image_embeds([reference])
    generator = [torch.Generator().manual_seed(seed)]
    return model.generate_from_tokens(cond, uncond, [PROMPT], [""], generator, 2, scale=scale, output_type="np", **SIZE)


def _diffusers(models, reference: Image.Image, scale: float, seed: int = 0) -> np.ndarray:
    pipe = FluxPipeline.from_pretrained(str(models.flux_dir), local_files_only=True)
    pipe.load_ip_adapter(
        str(models.ip_ckpt.parent),
        weight_name=models.ip_ckpt.name,
        image_encoder_pretrained_model_name_or_path=str(models.image_encoder_dir),
        image_encoder_dtype=torch.float32,
        local_files_only=True,
    )
    pipe.set_ip_adapter_scale(scale)
    generator = torch.Generator().manual_seed(seed)
    return pipe(PROMPT, ip_adapter_image=reference, num_inference_steps=2, generator=generator, output_type="np", **SIZE).images


def test_the_flux_family_generates_with_the_flux_wrapper(tiny_flux_dir) -> None:
    assert family_of(tiny_flux_dir).ip_adapter_class() is FluxIPAdapter
    assert native_image_size(tiny_flux_dir) == 1024  # FluxPipeline's default_sample_size 128 x the VAE's stride 8


def test_our_images_are_diffusers_load_ip_adapter_images(tiny_flux_models) -> None:
    reference = _references()[0]
    ours = _ours(tiny_flux_models, [reference], scale=0.7)
    assert np.abs(ours - _ours(tiny_flux_models, [reference], scale=0.0)).max() > 0.05  # the image prompt acts: this can fail
    assert np.abs(ours - _diffusers(tiny_flux_models, reference, scale=0.7)).max() <= IMAGE_TOLERANCE


def test_several_references_average_their_clip_embeddings(tiny_flux_models) -> None:
    model = load_generation_model(
        tiny_flux_models.flux_dir, tiny_flux_models.image_encoder_dir, tiny_flux_models.ip_ckpt, "cpu", torch.float32
    )
    first, second = _references()
    cond, uncond = model.get_image_embeds([[first, second], [first]])
    single, _ = model.get_image_embeds([first, second])
    assert cond.shape == uncond.shape == (2, TINY.image_encoder["projection_dim"])
    torch.testing.assert_close(cond[0], single.mean(dim=0))
    torch.testing.assert_close(cond[1], single[0])
    black, _ = model.get_image_embeds(Image.new("RGB", (64, 64)))
    torch.testing.assert_close(uncond, black.expand(2, -1))  # the negative image FluxPipeline uses when given none


def test_generate_is_the_official_signature_and_the_scale_is_per_call(tiny_flux_models) -> None:
    model = load_generation_model(
        tiny_flux_models.flux_dir, tiny_flux_models.image_encoder_dir, tiny_flux_models.ip_ckpt, "cpu", torch.float32
    )
    reference = _references()[0]
    kwargs = dict(num_samples=2, seed=3, num_inference_steps=2, output_type="np", **SIZE)
    strong = model.generate(reference, PROMPT, scale=1.0, **kwargs)
    assert np.abs(model.generate(reference, PROMPT, scale=0.0, **kwargs)[0] - strong[0]).max() > 0.05
    assert len(strong) == 2 and np.abs(strong[0] - strong[1]).max() > 0  # two samples from one generator
    np.testing.assert_array_equal(model.generate(reference, PROMPT, scale=1.0, **kwargs), strong)  # no scale left over


def test_an_adapter_for_another_image_encoder_is_one_line(tiny_flux_models, tmp_path) -> None:
    wider = save_image_encoder(
        tmp_path / "encoder", TINY.__class__(**{**TINY.__dict__, "image_encoder": {**TINY.image_encoder, "projection_dim": 24}})
    )
    with pytest.raises(BadInputError, match="image_embeds"):
        load_generation_model(tiny_flux_models.flux_dir, wider, tiny_flux_models.ip_ckpt, "cpu", torch.float32)


def test_a_batch_of_two_subjects_gives_each_row_its_own_subject(tiny_flux_models) -> None:
    """FluxPipeline conditions a call on one repeated image embedding: rows of different subjects in one
    batch must come out as each would alone (with its own generator), not attend to both subjects."""
    model = load_generation_model(
        tiny_flux_models.flux_dir, tiny_flux_models.image_encoder_dir, tiny_flux_models.ip_ckpt, "cpu", torch.float32
    )
    first, second = _references()
    cond, uncond = model.get_image_embeds([first, second, second])

    def images(rows: list[int]) -> np.ndarray:
        generators = [torch.Generator().manual_seed(row) for row in rows]
        return model.generate_from_tokens(
            cond[rows], uncond[rows], [PROMPT] * len(rows), [""] * len(rows), generators, 2, scale=1.0, output_type="np", **SIZE
        )

    batch = images([0, 1, 2])
    alone = np.concatenate([images([0]), images([1]), images([2])])
    assert np.abs(alone[0] - alone[1]).max() > 0.05  # the two subjects give other images: this can fail
    assert np.abs(batch - alone).max() <= 1e-5
