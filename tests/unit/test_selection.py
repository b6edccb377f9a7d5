"""`Selection.score`: the λ-calibration score over the select rows that exist."""

from __future__ import annotations

import math

import torch

from tasks.train_start import Selection


def _rows(n: int, label: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(n, 2), torch.full((n,), label)


def _always(label: int) -> torch.nn.Module:
    """A model that predicts `label` for every row."""
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([1.0, 0.0]) if label == 0 else torch.tensor([0.0, 1.0]))
    return model


def test_score_is_the_mean_of_new_and_old_accuracy() -> None:
    selection = Selection(new=_rows(4, 0), old=_rows(10, 1))
    assert selection.score(_always(0)) == 0.5  # new 1.0, old 0.0: rows do not weigh


def test_score_skips_a_missing_part() -> None:
    # no select rows among the new batches (a tiny batch), or none learned before
    assert Selection(new=None, old=_rows(3, 1)).score(_always(1)) == 1.0
    assert Selection(new=_rows(3, 1), old=None).score(_always(0)) == 0.0
    assert math.isnan(Selection(new=None, old=None).score(_always(0)))
