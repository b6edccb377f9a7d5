"""LwF distillation: zero at agreement, the KL formula, gradients reach only the student."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from continual.distillation import Distiller, distillation_loss


def test_zero_when_student_equals_teacher_positive_otherwise() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 5)
    assert float(distillation_loss(logits, logits.clone())) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(logits, logits + 3.0)) == pytest.approx(0.0, abs=1e-6)  # shift
    assert float(distillation_loss(logits, torch.randn(8, 5))) > 1e-3


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_matches_t_squared_kl_formula(temperature: float) -> None:
    torch.manual_seed(1)
    student, teacher = torch.randn(6, 4), torch.randn(6, 4)
    p_t = torch.softmax(teacher / temperature, dim=-1)
    log_p_s = torch.log_softmax(student / temperature, dim=-1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(dim=-1).mean()
    got = distillation_loss(student, teacher, temperature)
    torch.testing.assert_close(got, temperature**2 * kl)


def test_gradient_flows_only_to_the_student() -> None:
    torch.manual_seed(2)
    student = torch.randn(4, 3, requires_grad=True)
    teacher = torch.randn(4, 3, requires_grad=True)
    distillation_loss(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and float(student.grad.abs().sum()) > 0


def test_validation() -> None:
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        Distiller(nn.Linear(2, 2), alpha=1.5)


def test_distiller_freezes_a_copy_and_mixes_losses() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    distiller = Distiller(model, temperature=2.0, alpha=0.3)
    before = distiller.teacher_logits(x)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # training the student must not move the teacher
    model.train()
    logits = model(x)
    task = F.cross_entropy(logits, y)
    loss = distiller.loss(x, logits, task)
    assert torch.equal(distiller.teacher_logits(x), before)  # eval mode: dropout off, frozen
    expected = 0.3 * distillation_loss(logits, before, 2.0) + 0.7 * task
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in distiller.teacher.parameters())
    assert all(p.grad is not None for p in model.parameters())
