"""Knowledge distillation against a frozen teacher (Learning without Forgetting, LwF).

The old model's softened predictions act as soft targets, so the new model is pulled towards
what the champion answered on the *new* inputs without storing any old data.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from continual.models import as_logits


def distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 2.0
) -> Tensor:
    """T² · KL(softmax(z_teacher/T) ‖ softmax(z_student/T)), averaged over examples.

    The T² factor keeps gradient magnitudes comparable across temperatures. The teacher side is
    detached, so gradients only reach the student. Logits of shape [..., C] are flattened to
    [-1, C] (per-token mean for sequence outputs).

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
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


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
