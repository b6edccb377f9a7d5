"""The training loop's divergence abort: a non-finite loss or an exploding gradient stops the
run before the step that would apply it (docs/RELIABILITY.md). Losses and gradient norms stay on
the device between read-backs (`TrainSettings.sync_every`), so a GPU run is not synchronised
every step; the check still names the step where it happened.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class TrainingDivergedError(RuntimeError):
    """Training produced a non-finite loss or an exploding gradient; the run must stop.

    Raised before the optimiser step that would have applied it, so the model holds the last
    finite parameters. Callers train a copy (the champion is never touched): they drop it.
    """


class DivergenceWatch:
    """Per-step losses and gradient norms kept on the device until `drain` reads them back in
    one transfer and checks them in step order (the divergence abort)."""

    def __init__(self, abort_grad_norm: float) -> None:
        self.limit = abort_grad_norm
        self.steps: list[int] = []
        self.losses: list[Tensor] = []
        self.norms: list[Tensor] = []

    def add(self, step: int, loss: Tensor, grad_norm: Tensor) -> None:
        """Keep the step's loss and gradient norm (no device work: two list appends)."""
        self.steps.append(step)
        self.losses.append(loss)
        self.norms.append(grad_norm)

    def drain(self) -> list[tuple[int, float]]:
        """(step, loss) of the steps added since the last drain.

        Raises:
            TrainingDivergedError: at the first of them with a non-finite loss, or a non-finite
                or exploding gradient norm.
        """
        if not self.steps:
            return []
        kept = [t.detach() for t in (*self.losses, *self.norms)]
        if kept[0].device.type == "cpu":  # reading is free there; stacking would cost ~25 µs
            flat = [float(t) for t in kept]
        else:
            flat = torch.stack([t.float() for t in kept]).cpu().tolist()  # the one sync
        steps, n = self.steps, len(self.steps)
        rows = list(zip(flat[:n], flat[n:], strict=True))
        self.steps, self.losses, self.norms = [], [], []
        for step, (loss, norm) in zip(steps, rows, strict=True):
            _check_loss(loss, step)
            _check_grad_norm(norm, self.limit, step)
        return [(step, row[0]) for step, row in zip(steps, rows, strict=True)]


def _check_loss(value: float, step: int) -> None:
    """Raise TrainingDivergedError on a NaN/inf loss (bad inputs, a too-high learning rate)."""
    if not np.isfinite(value):
        raise TrainingDivergedError(
            f"training diverged at step {step}: the loss is {value} (check the learning rate "
            "and the batch's values; the champion is unchanged)"
        )


def _check_grad_norm(norm: float, limit: float, step: int) -> None:
    """Raise TrainingDivergedError on a non-finite or exploding total gradient norm."""
    if not np.isfinite(norm) or norm > limit:
        raise TrainingDivergedError(
            f"training diverged at step {step}: the gradient norm is {norm:.3g} (limit "
            f"{limit:.3g}); lower the learning rate or check the batch's values — the champion "
            "is unchanged"
        )
