"""FLUX's rectified-flow objective: the formula and defaults of diffusers' FLUX DreamBooth script, draws keyed on the pair."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from base_models.flow_matching import FlowMatchingObjective, FlowMatchingSettings, guidance
from common.errors import BadInputError
from stand_ins.flux import SCHEDULER

SHAPE = (4, 8, 8)


def objective(**settings) -> FlowMatchingObjective:
    return FlowMatchingObjective(FlowMatchEulerDiscreteScheduler(**SCHEDULER), FlowMatchingSettings(**settings))


def test_defaults_are_those_of_train_dreambooth_flux():
    assert FlowMatchingSettings() == FlowMatchingSettings(
        weighting_scheme="none", logit_mean=0.0, logit_std=1.0, mode_scale=1.29, guidance_scale=3.5
    )
    with pytest.raises(ValueError, match="weighting_scheme"):
        FlowMatchingSettings(weighting_scheme="uniform")


def test_noisy_and_target_are_the_rectified_flow():
    flow = objective()
    latents = torch.randn(3, *SHAPE)
    noise, timesteps = flow.draw(torch.tensor([1, 2, 3]), SHAPE)
    sigma = flow.sigmas(timesteps).view(-1, 1, 1, 1)
    assert torch.equal(flow.noisy(latents, noise, timesteps), (1 - sigma) * latents + sigma * noise)
    assert torch.equal(flow.target(latents, noise, timesteps), noise - latents)
    # at sigma = 1 the input is pure noise, at sigma -> 0 the clean latents: the path the target is the velocity of
    noisy = flow.noisy(latents, noise, timesteps)
    assert torch.allclose(noisy + (1 - sigma) * flow.target(latents, noise, timesteps), noise, atol=1e-5)
    assert torch.equal(flow.model_timestep(timesteps), timesteps / 1000)


def test_a_timestep_outside_the_table_is_refused():
    """Asserted on the tensors' device (no host read in a GPU step); on the CPU it raises at once."""
    flow = objective()
    _, timesteps = flow.draw(torch.tensor([1, 2]), SHAPE)
    with pytest.raises(RuntimeError, match="timesteps not drawn from this objective's table"):
        flow.sigmas(timesteps + 0.5)


def test_a_draw_is_what_the_script_draws_from_the_pairs_generator():
    """The script's steps (noise, then u, then index into the scheduler's table), on the generator seeded with the pair's seed."""
    flow = objective(weighting_scheme="logit_normal", logit_mean=0.5, logit_std=0.8)
    noise_drawn, timesteps = flow.draw(torch.tensor([11]), SHAPE)
    generator = torch.Generator().manual_seed(11)
    noise = torch.randn(SHAPE, generator=generator)
    u = compute_density_for_timestep_sampling("logit_normal", 1, 0.5, 0.8, 1.29, generator=generator)
    table = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    index = (u * 1000).long()
    assert torch.equal(noise_drawn[0], noise)
    assert torch.equal(timesteps, table.timesteps[index]) and torch.equal(flow.sigmas(timesteps), table.sigmas[index])


def test_each_pair_keeps_its_draw_whatever_its_batch():
    flow = objective()
    alone_noise, alone_t = flow.draw(torch.tensor([42]), SHAPE)
    noise, timesteps = flow.draw(torch.tensor([7, 42]), SHAPE)
    assert torch.equal(noise[1], alone_noise[0]) and torch.equal(timesteps[1], alone_t[0])
    assert not torch.equal(noise[0], noise[1])
    with pytest.raises(BadInputError, match="--noise_offset"):
        flow.draw(torch.tensor([1]), SHAPE, "cpu", 0.1)


def test_the_density_follows_the_settings():
    seeds = torch.arange(2000)
    uniform = objective().draw(seeds, (1,))[1] / 1000
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.03)
    shifted = objective(weighting_scheme="logit_normal", logit_mean=1.0).draw(seeds, (1,))[1] / 1000
    logits = torch.logit(shifted.clamp(1e-3, 1 - 1e-3))
    # u indexes the descending table (index 0 is sigma 1), so sigma ~ 1 - u: logit_mean 1 centres sigma at sigmoid(-1)
    assert logits.mean().item() == pytest.approx(-1.0, abs=0.1) and logits.std().item() == pytest.approx(1.0, abs=0.1)


def test_a_static_shift_in_the_scheduler_config_shifts_the_table():
    static = FlowMatchEulerDiscreteScheduler(**{**SCHEDULER, "use_dynamic_shifting": False})
    flow = FlowMatchingObjective(static)
    sigmas = flow.sigmas(flow.draw(torch.tensor([5]), (1,))[1])
    unshifted = objective().draw(torch.tensor([5]), (1,))[1] / 1000  # the same position on the unshifted table
    assert torch.allclose(sigmas, 3 * unshifted / (1 + 2 * unshifted), atol=1e-6)


@pytest.mark.parametrize(
    "scheme, expected",
    [
        ("none", lambda s: torch.ones_like(s)),
        ("sigma_sqrt", lambda s: s**-2.0),
        ("cosmap", lambda s: 2 / (math.pi * (1 - 2 * s + 2 * s**2))),
    ],
)
def test_loss_weights_follow_the_scheme(scheme, expected):
    flow = objective(weighting_scheme=scheme)
    _, timesteps = flow.draw(torch.tensor([1, 2]), SHAPE)
    weights = flow.loss_weights(timesteps, torch.zeros(2, *SHAPE))
    assert weights.shape == (2, 1, 1, 1) and torch.allclose(weights.flatten(), expected(flow.sigmas(timesteps)))
    assert flow.loss_weights(timesteps, torch.zeros(2, 16, 16)).shape == (2, 1, 1)  # packed latents broadcast too


def test_guidance_for_a_guidance_distilled_transformer_only():
    settings = FlowMatchingSettings(guidance_scale=4.0)
    assert torch.equal(guidance(settings, 3, guidance_embeds=True), torch.full((3,), 4.0))
    assert guidance(settings, 3, guidance_embeds=False) is None


def test_set_timesteps_on_the_given_scheduler_does_not_change_the_training_table():
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    scheduler.set_timesteps(4, mu=1.0)
    assert torch.equal(FlowMatchingObjective(scheduler).sigma_table, FlowMatchEulerDiscreteScheduler(**SCHEDULER).sigmas)


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "sigma_sqrt", "cosmap"])
def test_each_loss_weighs_each_rows_squared_error_by_the_scheme(scheme):
    """`row_weights` are the scheme's loss weights (None where they are all 1) and every loss applies them per row."""
    from patchdpo.method import compute_loss

    flow = objective(weighting_scheme=scheme)
    _, timesteps = flow.draw(torch.tensor([1, 2]), SHAPE)
    timesteps = timesteps.repeat(2)  # [references; generated] share their pair's timestep
    rows = flow.row_weights(timesteps)
    weights = flow.loss_weights(timesteps, torch.zeros(4, *SHAPE))
    assert (rows is None) == torch.equal(weights, torch.ones_like(weights))
    generator = torch.Generator().manual_seed(0)
    pred, target, reference = (torch.randn(4, *SHAPE, generator=generator) for _ in range(3))
    maps = torch.rand(2, 8, 8, generator=generator)
    squared = weights * (pred - target).square()
    assert torch.allclose(compute_loss("mse", pred, target, row_weights=rows).loss, squared.mean())
    patch = torch.cat([1 - maps, maps]).unsqueeze(1)
    loss = compute_loss("patch_dpo", pred, target, reference_map=maps, generated_map=maps, row_weights=rows).loss
    assert torch.allclose(loss, (patch * squared).mean())
    dpo = compute_loss("image_dpo", pred, target, reference_pred=reference, beta=10.0, row_weights=rows)
    per_image = lambda x: (weights * (x - target).square()).mean(dim=(1, 2, 3))  # noqa: E731
    inside = -5.0 * ((per_image(pred) - per_image(reference)).view(2, 2) * torch.tensor([[1.0], [-1.0]])).sum(0)
    assert torch.allclose(dpo.loss, -torch.nn.functional.logsigmoid(inside).mean())
