"""Training objectives on a pair batch `[reference images; generated images]`.

Every loss below sees a noise prediction `pred` (2B, C, h, w) whose first B rows are the
reference ("winner") images and whose last B rows are the generated ("loser") images of the same
B pairs; a pair shares its noise `eps` and timestep, so `target` is `eps` repeated (or the
v-prediction target). All arithmetic is done in float32 whatever the autocast dtype.

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

image_dpo (Diffusion-DPO, Wallace et al. 2023; the image-level ablation the paper argues
against)::

    e(x)  = mean_{c,y,x} (pred(x) - target)^2            per image, trained adapter
    r(x)  = mean_{c,y,x} (ref_pred(x) - target)^2         per image, frozen initial adapter
    D     = (e(x_w) - r(x_w)) - (e(x_l) - r(x_l))         x_w = reference, x_l = generated
    L     = mean_pairs  -log sigmoid(-beta / 2 * D)

  with the numerics of diffusers' `train_diffusion_dpo_sdxl.py` (per-image mean over C,h,w;
  `scale_term = -0.5 * beta`; default beta 5000 there and here).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from common.flags import LOSS_MODES  # defined with the flags, so --help needs no torch


class LossOutput(NamedTuple):
    loss: torch.Tensor
    #: Detached scalars worth logging next to the loss (empty for the regression losses).
    logs: dict[str, torch.Tensor]


def _check_pair_batch(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
    if pred.ndim != 4 or pred.shape[0] % 2:
        raise ValueError(f"expected a (2B, C, h, w) pair batch [reference; generated], got shape {tuple(pred.shape)}")


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def patch_weights(reference_map: torch.Tensor, generated_map: torch.Tensor) -> torch.Tensor:
    """(2B, 1, h, w) per-position weights `cat([1 - M_ref, M_gen])` for a pair batch."""
    if reference_map.ndim != 3 or reference_map.shape != generated_map.shape:
        raise ValueError(
            f"quality maps must both be (B, h, w), got reference {tuple(reference_map.shape)} and generated {tuple(generated_map.shape)}"
        )
    return torch.cat([1.0 - reference_map.float(), generated_map.float()], dim=0).unsqueeze(1)


def patch_dpo_loss(pred: torch.Tensor, target: torch.Tensor, reference_map: torch.Tensor, generated_map: torch.Tensor) -> torch.Tensor:
    _check_pair_batch(pred, target)
    weights = patch_weights(reference_map, generated_map)
    if weights.shape[0] != pred.shape[0] or weights.shape[-2:] != pred.shape[-2:]:
        raise ValueError(
            f"quality maps of shape {tuple(reference_map.shape)} do not match the pair batch {tuple(pred.shape)}: "
            f"expected ({pred.shape[0] // 2}, {pred.shape[-2]}, {pred.shape[-1]})"
        )
    return (weights * (pred.float() - target.float()).square()).mean()


def _per_image_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).square().mean(dim=tuple(range(1, pred.ndim)))


def image_dpo_loss(pred: torch.Tensor, reference_pred: torch.Tensor, target: torch.Tensor, beta: float) -> LossOutput:
    """Diffusion-DPO with the reference rows as winners; `reference_pred` comes from the frozen model."""
    _check_pair_batch(pred, target)
    _check_pair_batch(reference_pred, target)
    model_w, model_l = _per_image_mse(pred, target).chunk(2)
    with torch.no_grad():
        ref_w, ref_l = _per_image_mse(reference_pred, target).chunk(2)
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
) -> LossOutput:
    """Dispatch on `mode` (one of LOSS_MODES); each mode names the extra inputs it needs."""
    if mode == "mse":
        return LossOutput(mse_loss(pred, target), {})
    if mode == "patch_dpo":
        if reference_map is None or generated_map is None:
            raise ValueError("loss 'patch_dpo' needs reference_map and generated_map")
        return LossOutput(patch_dpo_loss(pred, target, reference_map, generated_map), {})
    if mode == "image_dpo":
        if reference_pred is None or beta is None:
            raise ValueError("loss 'image_dpo' needs reference_pred (frozen adapter) and beta")
        return image_dpo_loss(pred, reference_pred, target, beta)
    raise ValueError(f"unknown loss mode {mode!r}, expected one of {LOSS_MODES}")
