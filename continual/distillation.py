"""Knowledge distillation against a frozen teacher (Learning without Forgetting, LwF).

The old model's softened predictions act as soft targets, so the new model is pulled towards
what the champion answered on the *new* inputs without storing any old data.

Two forms, one `loss(inputs, student_logits, task_loss)` hook for the training loop:
`Distiller` mixes α·KD + (1−α)·task (classifiers); `TokenDistiller` adds w·KD per predicted
token to a causal LM's next-token loss, padding masked (`<section>.distill_weight`).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from continual.models import as_logits


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 2.0,
    *,
    mask: Tensor | None = None,
) -> Tensor:
    """T² · KL(softmax(z_teacher/T) ‖ softmax(z_student/T)), averaged over examples.

    The T² factor keeps gradient magnitudes comparable across temperatures. The teacher side is
    detached, so gradients only reach the student. Logits of shape [..., C] are flattened to
    [-1, C] (per-token mean for sequence outputs); with `mask` (bool, shape [...]) the mean
    runs over the positions where it is True only (padding does not count).

    Raises:
        ValueError: shapes differ or temperature is not positive.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    classes = student_logits.shape[-1]
    student = F.log_softmax(student_logits.reshape(-1, classes) / temperature, dim=-1)
    target = teacher_logits.detach().to(student_logits.dtype)  # e.g. a bf16 teacher under autocast
    teacher = F.log_softmax(target.reshape(-1, classes) / temperature, dim=-1)
    if mask is None:
        kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        return kl * temperature**2
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"mask {tuple(mask.shape)} must have the logits' shape without the class axis "
            f"{tuple(student_logits.shape[:-1])}"
        )
    keep = mask.reshape(-1).to(device=student.device, dtype=student.dtype)
    per_position = F.kl_div(student, teacher, log_target=True, reduction="none").sum(dim=-1)
    return (per_position * keep).sum() / keep.sum().clamp(min=1) * temperature**2


class Distiller:
    """LwF loss α·KD(student, teacher) + (1−α)·task with a frozen copy of the teacher.

    The teacher is deep-copied, put in eval mode and frozen at construction, so later training of
    the model it was copied from cannot change the soft targets.
    """

    def __init__(self, teacher: nn.Module, *, temperature: float = 2.0, alpha: float = 0.5) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha (weight of the distillation term) must be in [0, 1]: {alpha}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    @torch.no_grad()
    def teacher_logits(self, inputs: Tensor) -> Tensor:
        """The frozen teacher's logits on `inputs` (re-set to eval mode on every call)."""
        self.teacher.eval()
        return as_logits(self.teacher(inputs))

    def loss(self, inputs: Tensor, student_logits: Tensor, task_loss: Tensor) -> Tensor:
        """α·distillation_loss(student, teacher(inputs)) + (1−α)·task_loss.

        Args:
            inputs: the batch the student just saw (teacher input).
            student_logits: the student's logits on `inputs` (with grad).
            task_loss: the student's scalar task loss (e.g. cross-entropy on the labels).
        """
        kd = distillation_loss(student_logits, self.teacher_logits(inputs), self.temperature)
        return self.alpha * kd + (1.0 - self.alpha) * task_loss


class TokenDistiller:
    """Next-token loss + `weight` · per-token KD to a frozen teacher LM (the previous champion).

    The KD term compares the student's and the teacher's next-token distributions at every
    position whose target is a real token (the positions `continual.causal_lm.next_token_loss`
    counts), so padding never pulls either way. Additive rather than LwF's α-mix: weight 0 is
    exactly the plain next-token loss, and the task loss keeps its scale as the weight grows.
    """

    def __init__(
        self, teacher: nn.Module, *, weight: float, pad_token_id: int, temperature: float = 2.0
    ) -> None:
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"distillation weight must be >= 0, got {weight}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.pad_token_id = int(pad_token_id)

    @torch.no_grad()
    def teacher_logits(self, inputs: Tensor) -> Tensor:
        """The frozen teacher's logits [N, L, V] on token ids `inputs` (on their device)."""
        self.teacher.to(inputs.device).eval()
        return as_logits(self.teacher(inputs))

    def loss(self, inputs: Tensor, student_logits: Tensor, task_loss: Tensor) -> Tensor:
        """task_loss + weight · T²·KL(teacher ‖ student), averaged over non-pad target tokens.

        Args:
            inputs: the right-padded token ids [N, L] the student just saw.
            student_logits: the student's logits [N, L, V] on `inputs` (with grad).
            task_loss: the student's next-token loss on `inputs`.
        """
        from continual.causal_lm import IGNORE_INDEX, next_token_labels

        mask = next_token_labels(inputs, self.pad_token_id) != IGNORE_INDEX  # [N, L-1]
        width = mask.shape[1]
        teacher = self.teacher_logits(inputs)
        kd = distillation_loss(
            student_logits[:, :width], teacher[:, :width], self.temperature, mask=mask
        )
        return task_loss + self.weight * kd
