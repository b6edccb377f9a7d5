"""LwF distillation: zero at agreement, the KL formula, gradients reach only the student."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from continual.distillation import Distiller, TokenDistiller, distillation_loss


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


def test_masked_loss_averages_kl_over_kept_positions_only() -> None:
    torch.manual_seed(3)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    expected = torch.stack(
        [
            distillation_loss(student[i, t : t + 1], teacher[i, t : t + 1], 2.0)
            for i in range(2)
            for t in range(5)
            if mask[i, t]
        ]
    ).mean()
    got = distillation_loss(student, teacher, 2.0, mask=mask)
    torch.testing.assert_close(got, expected)
    changed = teacher.clone()
    changed[0, 3:] = 100 * torch.randn(2, 7)  # what padding positions hold does not count
    torch.testing.assert_close(distillation_loss(student, changed, 2.0, mask=mask), got)
    with pytest.raises(ValueError, match="mask"):
        distillation_loss(student, teacher, mask=mask[:, :4])


class _TinyLM(nn.Module):
    """Token ids [N, L] → logits [N, L, V]: embedding + linear, enough to check the loss."""

    def __init__(self, vocab: int = 9) -> None:
        super().__init__()
        self.embed, self.out = nn.Embedding(vocab, 4), nn.Linear(4, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(ids))


def test_token_distiller_adds_weighted_kl_on_real_targets_only() -> None:
    from continual.causal_lm import next_token_loss

    torch.manual_seed(4)
    teacher, student = _TinyLM(), _TinyLM()
    ids = torch.tensor([[5, 6, 7, 0, 0], [3, 4, 5, 6, 8]])  # pad = 0
    logits = student(ids).detach()
    task = next_token_loss(logits, ids, 0)
    off = TokenDistiller(teacher, weight=0.0, pad_token_id=0)
    assert float(off.loss(ids, logits, task)) == pytest.approx(float(task))
    on = TokenDistiller(teacher, weight=2.0, pad_token_id=0, temperature=1.5)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)  # next token not pad
    kd = distillation_loss(logits[:, :4], teacher(ids)[:, :4], 1.5, mask=mask)
    assert float(on.loss(ids, logits, task)) == pytest.approx(float(task + 2.0 * kd), rel=1e-6)
    with pytest.raises(ValueError, match="weight"):
        TokenDistiller(teacher, weight=-1.0, pad_token_id=0)
