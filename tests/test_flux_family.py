"""FLUX as a base-model family: prompts as FluxPipeline encodes them, latents, and one training step on tiny FLUX."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxPipeline

from base_models.flux import FluxFamily
from base_models.flux_latents import pack_latents
from ip_adapter.flux_ip_adapter import adapter_parameters
from patchdpo.method import patch_dpo_loss
from stand_ins.flux import TINY, build_image_encoder, save_flux_configs
from tests.kit.flux import *  # noqa: F401,F403

PROMPTS = ["a photo of a dog on the beach", "a cat wearing a red hat in the snow"]


def test_prompts_are_encoded_as_the_pipeline_encodes_them(tiny_flux_dir):
    family = FluxFamily()
    tokenizers, encoders = family.load_text(tiny_flux_dir, None)
    prompt = family.encode_prompts(encoders, family.tokenize(tokenizers, PROMPTS))
    pipe = FluxPipeline.from_pretrained(str(tiny_flux_dir), local_files_only=True)
    with torch.no_grad():  # as the pipeline's __call__ runs it
        prompt_embeds, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=512)
    assert torch.equal(prompt["prompt_embeds"], prompt_embeds) and torch.equal(prompt["pooled_prompt_embeds"], pooled)
    assert family.latent_scale(TINY.vae) == 8


def test_the_forward_is_the_pipelines_denoising_step(tiny_flux_dir):
    """One Euler step of FluxPipeline from given latents equals x + (0 - sigma) * family.denoise(...): packing, ids,
    timestep scale and guidance as the pipeline feeds them."""
    family = FluxFamily()
    pipe = FluxPipeline.from_pretrained(str(tiny_flux_dir), local_files_only=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stepped = pipe(PROMPTS[0], latents=pack_latents(latents), height=64, width=64, num_inference_steps=1, output_type="latent").images
        timestep, sigma = pipe.scheduler.timesteps[:1], pipe.scheduler.sigmas[0]
        prompt = family.encode_prompts(
            (pipe.text_encoder, pipe.text_encoder_2), family.tokenize((pipe.tokenizer, pipe.tokenizer_2), PROMPTS[:1])
        )
        added = {"pooled_projections": prompt["pooled_prompt_embeds"]}
        velocity = family.denoise(pipe.transformer, latents, timestep, prompt["prompt_embeds"], added)
    assert torch.allclose(stepped, pack_latents(latents - sigma * velocity), atol=1e-5)


def test_one_training_step_on_tiny_flux_trains_only_the_adapter(tiny_flux_dir):
    family = FluxFamily()
    transformer = family.load_denoiser(tiny_flux_dir, None).requires_grad_(False)
    vae = family.load_vae(tiny_flux_dir, None)
    tokenizers, encoders = family.load_text(tiny_flux_dir, None)
    objective = family.load_objective(tiny_flux_dir)
    family.install_adapter(transformer, num_tokens=4, image_embed_dim=TINY.image_encoder["projection_dim"])
    trained = adapter_parameters(transformer)
    for parameter in trained.values():
        parameter.requires_grad_(True)
    frozen_before = {name: p.detach().clone() for name, p in transformer.named_parameters() if name not in trained}
    adapter_before = {name: p.detach().clone() for name, p in trained.items()}
    optimizer = torch.optim.AdamW(trained.values(), lr=1e-3)

    batch = 2  # pairs: latents [references; generated], 64 px -> an 8x8 latent grid
    pixels = torch.rand(2 * batch, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = family.encode_latents(vae, pixels)
    prompt = family.encode_prompts(encoders, family.tokenize(tokenizers, PROMPTS))
    with torch.no_grad():
        image_embeds = build_image_encoder(TINY)(torch.rand(batch, 3, 224, 224)).image_embeds
    noise, timesteps = objective.draw(torch.tensor([11, 12]), latents.shape[1:], "cpu")
    noise, timesteps = noise.repeat(2, 1, 1, 1), timesteps.repeat(2)
    added = {**family.added_conditioning(prompt, None, None, 64), "image_embeds": image_embeds.repeat(2, 1)}
    hidden = prompt["prompt_embeds"].repeat(2, 1, 1)
    pred = family.denoise(transformer, objective.noisy(latents, noise, timesteps), timesteps, hidden, added)
    maps = torch.rand(batch, 8, 8, generator=torch.Generator().manual_seed(1))
    loss = patch_dpo_loss(pred, objective.target(latents, noise, timesteps), maps, maps.flip(-1))
    loss.backward()
    optimizer.step()

    assert latents.shape == pred.shape == (4, 4, 8, 8) and torch.isfinite(loss)
    assert all(torch.equal(p, frozen_before[name]) for name, p in transformer.named_parameters() if name not in trained)
    moved = {name for name, p in trained.items() if not torch.equal(p, adapter_before[name])}
    assert {name for name in moved if "to_v_ip" in name} == {name for name in trained if "to_v_ip" in name}
    assert not any("to_k_ip" in name for name in moved)  # keys move from the second step: the values started at zero


def test_the_memory_plan_builds_flux_dev_from_its_configs(tmp_path):
    """FLUX.1-dev's published configs, built on the meta device: transformer ~11.9 B, T5-XXL encoder ~4.76 B, CLIP-L text ~123 M."""
    paths = save_flux_configs(tmp_path)
    with torch.device("meta"):
        transformer, vae, (clip, t5) = FluxFamily().plan_models(lambda sub: json.loads((paths.flux_dir / sub).read_text()))
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(transformer) == pytest.approx(11.9e9, rel=0.005) and count(t5) == pytest.approx(4.76e9, rel=0.01)
    assert count(clip) == pytest.approx(123e6, rel=0.01) and vae.config.latent_channels == 16
