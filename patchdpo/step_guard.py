"""One agreement per optimizer step: every process's loss and gradients are finite, and whether to stop.

A NaN or inf loss (or gradient) at step N would otherwise be applied to the weights, written into
the next checkpoint, and noticed only at the next logging step, as a traceback naming neither step
nor data. A stop signal (SIGTERM from a cluster, Ctrl-C) reaches one process, but all of them must
save the same step and leave together.

Both questions are settled once per optimizer step, just before `optimizer.step()`, in one
collective and one host sync: each micro-step only records on the device whether its loss was
finite (no sync), and the gradient norm is the one clipping computes anyway (`clip_grad_norm_`
with an infinite maximum when `--max_grad_norm` is off). Under fp16 loss scaling an inf gradient
is routine (the scaler skips that step), so there only the losses count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from accelerate import Accelerator

from common.errors import ReportedError

from .pair_dataset import TrainingPair


class TrainingDivergedError(ReportedError):
    """Training produced a NaN/inf loss or gradient; nothing was applied or saved. Not bad input: the run itself diverged."""

    exit_code = 3


class StepGuard:
    """Collects a step's micro-batches, then agrees across processes before the optimizer step (`agree`)."""

    def __init__(self, accelerator: Accelerator, pairs: Sequence[TrainingPair]) -> None:
        self.accelerator = accelerator
        self.pairs = pairs  # the dataset's pairs, to name the samples of a step that goes non-finite
        self._bad_losses: torch.Tensor | None = None
        self._indices: list[torch.Tensor] = []

    def watch(self, loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """Record a micro-batch's loss (on the device, without a sync) and its dataset indices."""
        bad = (~torch.isfinite(loss.detach())).any().float()
        self._bad_losses = bad if self._bad_losses is None else self._bad_losses + bad
        self._indices.append(batch["index"])

    def agree(self, grad_norm: torch.Tensor | None, step: int, stop_requested: bool) -> bool:
        """True if any process asked to stop; raises `TrainingDivergedError` (on every process) if any step went non-finite.

        `grad_norm` is the (unclipped) norm of the adapter's gradients; `step` the optimizer step
        about to be taken, for the message.
        """
        bad_loss = self._bad_losses if self._bad_losses is not None else torch.zeros((), device=self.accelerator.device)
        bad_gradient = torch.zeros_like(bad_loss)
        if grad_norm is not None and self.accelerator.scaler is None:
            bad_gradient = (~torch.isfinite(grad_norm.detach())).float().to(bad_loss.device)
        local = torch.stack([bad_loss.clamp(max=1), bad_gradient, torch.tensor(float(stop_requested), device=bad_loss.device)])
        total = self.accelerator.reduce(local, "sum").tolist()
        indices = torch.cat(self._indices).tolist() if self._indices else []
        self._bad_losses, self._indices = None, []
        if total[0] or total[1]:
            self._raise(step, bool(local[0].item()), bool(local[1].item()), indices)
        return total[2] > 0

    def _raise(self, step: int, bad_loss: bool, bad_gradient: bool, indices: list[int]) -> None:
        what = "loss" if bad_loss else "gradient" if bad_gradient else "loss or gradient on another process"
        samples = ", ".join(f"{self.pairs[i].sample} k={self.pairs[i].generated_index} (index {i})" for i in indices)
        raise TrainingDivergedError(
            f"step {step}: non-finite {what} before the optimizer step, nothing applied or saved; this process's pairs: {samples}. "
            "Check these samples' images and quality maps, or lower --learning_rate"
        )
