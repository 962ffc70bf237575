"""The rectified-flow training objective of FLUX, as diffusers' FLUX training scripts define it.

For clean latents x0, noise eps and sigma in (0, 1]:

    x_t    = (1 - sigma) x0 + sigma eps          (noisy)
    target = eps - x0                            (what the transformer predicts)
    loss   = weight(sigma) * (prediction - target)^2

sigma is drawn as in `examples/dreambooth/train_dreambooth_flux.py`: u from
`compute_density_for_timestep_sampling(weighting_scheme, logit_mean, logit_std, mode_scale)`, then
index `int(u * num_train_timesteps)` into the scheduler's training table (`scheduler.sigmas`,
`scheduler.timesteps` of a fresh `FlowMatchEulerDiscreteScheduler` built from the model's
scheduler config). The table runs from sigma 1 down (index 0 is pure noise), so sigma ~ 1 - u: a
`logit_mean` m centres sigma near sigmoid(-m), exactly as in the script. That table is where the shift lives: FLUX.1-dev's scheduler shifts dynamically
at sampling time (`use_dynamic_shifting=True`), so its training table is unshifted, sigma = t/1000;
a scheduler config with a static `shift` gives the shifted table. The loss weight is
`compute_loss_weighting_for_sd3(weighting_scheme, sigma)`. The transformer receives
`timestep / 1000` (it multiplies by 1000 itself) and, when guidance-distilled (`guidance_embeds`,
as FLUX.1-dev), the guidance value `guidance_scale`.

Defaults (`FlowMatchingSettings`) are that script's flag defaults: `--weighting_scheme none`
(uniform u, unit weights), `--logit_mean 0.0`, `--logit_std 1.0`, `--mode_scale 1.29`,
`--guidance_scale 3.5`.

Randomness is keyed on the pair, as for the other families: pair i's noise and then its u are
drawn from a CPU generator seeded with `noise_seeds[i]` (a function of seed, epoch and dataset
index), and both halves of the pair, reference and generated, share them (the training step repeats the draw for the two halves).
So the process, the micro-batch and the device a pair lands on never change how it is trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from common.errors import BadInputError
from common.flags import FLOW_MATCHING_DEFAULTS, WEIGHTING_SCHEMES

from .family import Objective

#: FluxTransformer2DModel multiplies the timestep it is given by this, so it is given t / 1000.
TIMESTEP_SCALE = 1000.0


@dataclass(frozen=True)
class FlowMatchingSettings:
    """Timestep density, loss weighting and guidance; the defaults are those of diffusers' train_dreambooth_flux.py."""

    weighting_scheme: str = FLOW_MATCHING_DEFAULTS["weighting_scheme"]
    logit_mean: float = FLOW_MATCHING_DEFAULTS["logit_mean"]
    logit_std: float = FLOW_MATCHING_DEFAULTS["logit_std"]
    mode_scale: float = FLOW_MATCHING_DEFAULTS["mode_scale"]
    guidance_scale: float = FLOW_MATCHING_DEFAULTS["guidance_scale"]

    def __post_init__(self) -> None:
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme {self.weighting_scheme!r} is not one of {WEIGHTING_SCHEMES}")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) values shaped to broadcast over `like`'s rows, whether latents are (N, C, h, w) or packed (N, L, D)."""
    return values.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))


class FlowMatchingObjective(Objective):
    """draw -> noisy / target, and FLUX's loss weights and model timestep, for its rectified flow."""

    def __init__(self, scheduler: FlowMatchEulerDiscreteScheduler, settings: FlowMatchingSettings | None = None) -> None:
        # A fresh scheduler from the config: the training table, whatever `set_timesteps` did to `scheduler`.
        table = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        self.sigma_table = table.sigmas.to(torch.float32)
        self.timestep_table = table.timesteps.to(torch.float32)
        self.num_train_timesteps = int(table.config.num_train_timesteps)
        self.settings = settings or FlowMatchingSettings()

    def draw(
        self, noise_seeds: torch.Tensor, latent_shape: Sequence[int], device: torch.device | str = "cpu", noise_offset: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise (B, *latent_shape), timesteps (B,)): pair i's from a CPU generator seeded with `noise_seeds[i]`, moved to `device`."""
        if noise_offset:
            raise BadInputError("--noise_offset shifts DDPM noise (SD 1.5, SDXL); FLUX's rectified flow has no offset: drop the flag")
        noises, indices = [], []
        s = self.settings
        for seed in noise_seeds.tolist():
            generator = torch.Generator().manual_seed(int(seed))
            noises.append(torch.randn(tuple(latent_shape), generator=generator))
            u = compute_density_for_timestep_sampling(s.weighting_scheme, 1, s.logit_mean, s.logit_std, s.mode_scale, generator=generator)
            indices.append((u * self.num_train_timesteps).long())
        # u can reach 1.0 (mode scheme at u=0, a saturated sigmoid): the last entry of the table, not past it.
        index = torch.cat(indices).clamp(0, self.num_train_timesteps - 1)
        return torch.stack(noises).to(device), self.timestep_table[index].to(device)

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Each timestep's sigma, looked up in the table as the script's `get_sigmas` does.

        A timestep missing from the table is asserted on the device (`torch._assert_async`): an `if` on the
        comparison would stop a GPU step for a host read, and the CUDA rehearsal cannot read values at all."""
        matches = self.timestep_table.to(timesteps.device)[None, :] == timesteps.float()[:, None]
        torch._assert_async(matches.any(dim=1).all(), "timesteps not drawn from this objective's table")
        return self.sigma_table.to(timesteps.device)[matches.float().argmax(dim=1)]

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigma = _per_row(self.sigmas(timesteps), latents)
        return (1.0 - sigma) * latents + sigma * noise.to(latents.dtype)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise.to(latents.dtype) - latents

    def loss_weights(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-row weights shaped to broadcast over `like` (ones under the default scheme 'none')."""
        weights = compute_loss_weighting_for_sd3(self.settings.weighting_scheme, sigmas=self.sigmas(timesteps))
        return _per_row(weights, like.float())

    def row_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """`compute_loss_weighting_for_sd3`'s weights for sigma_sqrt and cosmap; None for the schemes that weigh every row 1."""
        if self.settings.weighting_scheme not in ("sigma_sqrt", "cosmap"):
            return None
        return compute_loss_weighting_for_sd3(self.settings.weighting_scheme, sigmas=self.sigmas(timesteps)).float()

    def model_timestep(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps / TIMESTEP_SCALE


def guidance(settings: FlowMatchingSettings, rows: int, guidance_embeds: bool, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The guidance value for a guidance-distilled transformer (FLUX.1-dev), None for one without guidance embedding."""
    if not guidance_embeds:
        return None
    return torch.full((rows,), settings.guidance_scale, dtype=torch.float32, device=device)
