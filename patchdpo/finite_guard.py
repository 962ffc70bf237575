"""Stop a diverging run before its optimizer step, so no checkpoint ever holds a NaN.

A NaN or inf loss (or gradient) at step N would otherwise be applied to the weights, written into
the next checkpoint, and noticed only at the next logging step, as a traceback naming neither step
nor data. The check runs every step: one `isfinite` over the loss and the adapter's gradient norm,
one host sync. Under fp16 loss scaling an inf gradient is routine (the scaler skips that step), so
there only the loss is checked. The processes agree on the outcome, so all of them stop together.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from accelerate import Accelerator
from torch.nn.utils import get_total_norm

from common.errors import BadInputError

from .pair_dataset import TrainingPair


class NonFiniteStepError(BadInputError):
    """Training produced a NaN/inf loss or gradient; the cure is in the inputs (data, learning rate, precision)."""


def check_step_is_finite(
    accelerator: Accelerator,
    loss: torch.Tensor,
    parameters: Iterable[torch.nn.Parameter],
    step: int,
    batch: dict[str, torch.Tensor],
    pairs: Sequence[TrainingPair],
) -> None:
    """Raise `NonFiniteStepError` naming `step` and this process's samples unless loss and gradients are finite everywhere.

    Call it after `backward` and before `optimizer.step()`; `batch["index"]` holds the dataset
    indices of the batch, `pairs` the dataset's pairs.
    """
    values = [loss.detach().float().reshape(1)]
    if accelerator.scaler is None:
        grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
        if grads:
            values.append(get_total_norm(grads).float().reshape(1).to(loss.device))
    local_bad = (~torch.isfinite(torch.cat(values))).any().float()
    if not accelerator.reduce(local_bad, "sum").item():
        return
    what = "loss" if not torch.isfinite(loss.detach()).all() else "gradient" if local_bad.item() else "loss or gradient on another process"
    samples = ", ".join(f"{pairs[i].sample} k={pairs[i].k} (index {i})" for i in batch["index"].tolist())
    raise NonFiniteStepError(
        f"step {step}: non-finite {what} before the optimizer step, nothing applied or saved; batch: {samples}. "
        "Check these samples' images and quality maps, or lower --learning_rate"
    )
