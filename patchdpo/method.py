"""PatchDPO's method in one file: the patch weights, the three objectives and the training step.

One step on B pairs (reference image, generated image):

* latents `[reference; generated]` (2B) from the VAE (`base_models` family: scale, shift);
* one noise and one timestep per pair, shared by its two halves, drawn by the family's objective
  from a generator seeded with the pair's `noise_seed`, a function of `(seed, epoch, dataset
  index)`: neither the process a pair lands on, nor its micro-batch, nor a resume, nor the cache
  changes how it is trained;
* the reference's image conditioning (the family's adapter: image tokens from the frozen Resampler
  on CLIP penultimate features for SDXL / SD 1.5, CLIP `image_embeds` into XLabs' trained
  projection for FLUX) and the prompt conditioning, both used for the two halves;
* the prediction `pred` (2B, C, h, w) and the objective's `target` (noise or velocity for the UNet
  families, `eps - x0` for FLUX's rectified flow, on the unpacked latent grid: see
  `base_models.flux_latents` for why the patch weights are per latent position), and one of the
  losses below, all in float32 whatever the autocast dtype. Where the objective weighs rows by
  their timestep (`Objective.row_weights`: FLUX's `--weighting_scheme sigma_sqrt` / `cosmap`),
  each row's squared error is multiplied by its weight in every loss; otherwise (every UNet run,
  FLUX's default) there is no product.

patch_dpo (PatchDPO, the reference code's `--use_dpo_loss True`)::

    W   = cat([1 - M_ref, M_gen])                        (2B, 1, h, w), broadcast over C
    L   = mean_{n,c,y,x}  W[n,y,x] * (pred - target)[n,c,y,x]^2

  `M_ref` / `M_gen` are the per-latent-position quality maps of the reference and the generated
  image. The mean runs over all 2B*C*h*w elements and is *not* normalised by sum(W): that is the
  official `weighted_mse_loss`, and it keeps all-zero weights at loss 0 instead of NaN. Reference
  patches are pulled towards where the generated image failed (1 - M_ref large), generated
  patches where it succeeded (M_gen large).

mse (`--use_dpo_loss False`)::

    L = mean (pred - target)^2

image_dpo (Diffusion-DPO, Wallace et al. 2023; the image-level ablation the paper argues against)::

    e(x)  = mean_{c,y,x} (pred(x) - target)^2            per image, trained adapter
    r(x)  = mean_{c,y,x} (ref_pred(x) - target)^2         per image, frozen initial adapter
    D     = (e(x_w) - r(x_w)) - (e(x_l) - r(x_l))         x_w = reference, x_l = generated
    L     = mean_pairs  -log sigmoid(-beta / 2 * D)

  with the numerics of diffusers' `train_diffusion_dpo_sdxl.py` (per-image mean over C,h,w;
  `scale_term = -0.5 * beta`; default beta 5000 there and here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from base_models import Objective
from base_models.family import Tensors
from common.flags import LOSS_MODES  # defined with the flags, so --help needs no torch

from .models import FrozenEncoders


class LossOutput(NamedTuple):
    loss: torch.Tensor
    #: Detached scalars worth logging next to the loss (empty for the regression losses).
    logs: dict[str, torch.Tensor]


def _check_pair_batch(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    if pred.ndim != 4 or pred.shape[0] % 2:
        raise ValueError(f"expected a (2B, C, h, w) pair batch [reference; generated], got shape {tuple(pred.shape)}")


def mse_loss(pred: torch.Tensor, target: torch.Tensor, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    if row_weights is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    return (_rows(row_weights, pred) * (pred.float() - target.float()).square()).mean()


def _rows(row_weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) per-row weights broadcast over (N, ...) `like`."""
    return row_weights.float().to(like.device).view(-1, *([1] * (like.ndim - 1)))


def patch_weights(reference_map: torch.Tensor, generated_map: torch.Tensor) -> torch.Tensor:
    """(2B, 1, h, w) per-position weights `cat([1 - M_ref, M_gen])` for a pair batch."""
    if reference_map.ndim != 3 or reference_map.shape != generated_map.shape:
        raise ValueError(
            f"quality maps must both be (B, h, w), got reference {tuple(reference_map.shape)} and generated {tuple(generated_map.shape)}"
        )
    return torch.cat([1.0 - reference_map.float(), generated_map.float()], dim=0).unsqueeze(1)


def patch_dpo_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    reference_map: torch.Tensor,
    generated_map: torch.Tensor,
    row_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    _check_pair_batch(pred, target)
    weights = patch_weights(reference_map, generated_map)
    if row_weights is not None:
        weights = weights * _rows(row_weights, weights)
    if weights.shape[0] != pred.shape[0] or weights.shape[-2:] != pred.shape[-2:]:
        raise ValueError(
            f"quality maps of shape {tuple(reference_map.shape)} do not match the pair batch {tuple(pred.shape)}: "
            f"expected ({pred.shape[0] // 2}, {pred.shape[-2]}, {pred.shape[-1]})"
        )
    return (weights * (pred.float() - target.float()).square()).mean()


def _per_image_mse(pred: torch.Tensor, target: torch.Tensor, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    errors = (pred.float() - target.float()).square().mean(dim=tuple(range(1, pred.ndim)))
    return errors if row_weights is None else errors * row_weights.float().to(errors.device)


def image_dpo_loss(
    pred: torch.Tensor, reference_pred: torch.Tensor, target: torch.Tensor, beta: float, row_weights: torch.Tensor | None = None
) -> LossOutput:
    """Diffusion-DPO with the reference rows as winners; `reference_pred` comes from the frozen model."""
    _check_pair_batch(pred, target)
    _check_pair_batch(reference_pred, target)
    model_w, model_l = _per_image_mse(pred, target, row_weights).chunk(2)
    with torch.no_grad():
        ref_w, ref_l = _per_image_mse(reference_pred, target, row_weights).chunk(2)
    inside = -0.5 * beta * ((model_w - ref_w) - (model_l - ref_l))
    loss = -F.logsigmoid(inside).mean()
    # Share of pairs where the trained model already prefers the winner more than the frozen one.
    implicit_acc = (inside > 0).float().mean() + 0.5 * (inside == 0).float().mean()
    logs = {
        "model_mse": 0.5 * (model_w.mean() + model_l.mean()).detach(),
        "reference_mse": 0.5 * (ref_w.mean() + ref_l.mean()),
        "implicit_acc": implicit_acc.detach(),
    }
    return LossOutput(loss, logs)


def compute_loss(
    mode: str,
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    reference_map: torch.Tensor | None = None,
    generated_map: torch.Tensor | None = None,
    reference_pred: torch.Tensor | None = None,
    beta: float | None = None,
    row_weights: torch.Tensor | None = None,
) -> LossOutput:
    """Dispatch on `mode` (one of LOSS_MODES); each mode names the extra inputs it needs.

    `row_weights` (2B,): the objective's per-timestep weights of each row's squared error (`Objective.row_weights`)."""
    if mode == "mse":
        return LossOutput(mse_loss(pred, target, row_weights), {})
    if mode == "patch_dpo":
        if reference_map is None or generated_map is None:
            raise ValueError("loss 'patch_dpo' needs reference_map and generated_map")
        return LossOutput(patch_dpo_loss(pred, target, reference_map, generated_map, row_weights), {})
    if mode == "image_dpo":
        if reference_pred is None or beta is None:
            raise ValueError("loss 'image_dpo' needs reference_pred (frozen adapter) and beta")
        return image_dpo_loss(pred, reference_pred, target, beta, row_weights)
    raise ValueError(f"unknown loss mode {mode!r}, expected one of {LOSS_MODES}")


@dataclass
class EncodedPairs:
    """Everything a step needs for B pairs, whether encoded now or read from the cache."""

    latents: torch.Tensor  # (2B, C, h, w) float32, [references; generated]
    image_features: torch.Tensor  # (B, L, D) CLIP penultimate features of the references
    prompt: Tensors  # the family's prompt tensors (B, ...); "prompt_embeds" is what cross-attention reads
    reference_size: torch.Tensor  # (B, 2) original (H, W)
    generated_size: torch.Tensor
    reference_map: torch.Tensor  # (B, h, w)
    generated_map: torch.Tensor
    noise_seeds: torch.Tensor  # (B,) int64, each pair's noise and timestep seed

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor], encoders: FrozenEncoders) -> EncodedPairs:
        """What the batch carries as encoder outputs (from the cache) is used as it is; the frozen `encoders` run on what
        it carries as their inputs (pixels, token ids, CLIP pixels)."""
        family = encoders.family
        if "reference_latents" in batch:
            latents = torch.cat([batch["reference_latents"], batch["generated_latents"]]).float()
        else:
            latents = encoders.latents(torch.cat([batch["reference_pixels"], batch["generated_pixels"]]))
        if all(name in batch for name in family.prompt_fields):
            prompt = {name: batch[name] for name in family.prompt_fields}
        else:
            prompt = encoders.prompts({name: batch[name] for name in family.token_fields})
        image_features = batch["image_features"] if "image_features" in batch else encoders.image_features(batch["clip_pixels"])
        return cls(
            latents=latents,
            image_features=image_features,
            prompt=prompt,
            reference_size=batch["reference_size"],
            generated_size=batch["generated_size"],
            reference_map=batch["reference_map"],
            generated_map=batch["generated_map"],
            noise_seeds=batch["noise_seed"],
        )


@dataclass(frozen=True)
class Method:
    """What a step is asked to do: the loss and its settings, the objective, and (image_dpo) the frozen adapter's forward."""

    loss: str
    objective: Objective
    resolution: int
    noise_offset: float | None = None
    dpo_beta: float | None = None
    #: image_dpo's reference policy: the model's forward with the frozen initial adapter (`models.frozen_adapter_copy`).
    reference_forward: Callable[..., torch.Tensor] | None = None


def training_step(model: nn.Module, pairs: EncodedPairs, method: Method) -> LossOutput:
    """Forward pass and loss for one batch of pairs; `pairs.noise_seeds` fix their noise and timesteps."""
    latents = pairs.latents
    device = latents.device
    noise, timesteps = method.objective.draw(pairs.noise_seeds, latents.shape[1:], device, method.noise_offset)
    noise, timesteps = noise.repeat(2, 1, 1, 1), timesteps.repeat(2)
    noisy = method.objective.noisy(latents, noise, timesteps)
    target = method.objective.target(latents, noise, timesteps)
    family = _unwrapped(model).family
    added = family.added_conditioning(pairs.prompt, pairs.reference_size, pairs.generated_size, method.resolution)
    inputs = (noisy, timesteps, pairs.image_features, pairs.prompt["prompt_embeds"], added)
    pred = model(*inputs)
    reference_pred = None
    if method.loss == "image_dpo":
        if method.reference_forward is None:
            raise ValueError("loss 'image_dpo' needs the frozen reference adapter's forward (Method.reference_forward)")
        with torch.no_grad():
            reference_pred = method.reference_forward(inputs)
    return compute_loss(
        method.loss,
        pred,
        target,
        reference_map=pairs.reference_map.to(device),
        generated_map=pairs.generated_map.to(device),
        reference_pred=reference_pred,
        beta=method.dpo_beta,
        row_weights=method.objective.row_weights(timesteps),
    )


def _unwrapped(model: nn.Module) -> nn.Module:
    """The training model under a DDP (or compile) wrapper, which hides its attributes."""
    while not hasattr(model, "family") and hasattr(model, "module"):
        model = model.module
    return model
