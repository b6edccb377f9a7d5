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


def _trained_to(label: int) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in _always(label).named_parameters()}


def test_the_best_step_on_the_select_rows_is_kept_and_loaded() -> None:
    """Early stopping on the select rows: a run whose snapshot at step 10 is right on them and
    whose last step is not keeps step 10, in the model."""
    from continual.training import TrainResult
    from tasks.train_ewc import _best_step

    model = _always(1)  # the run's last step: wrong on every select row
    result = TrainResult(snapshots={10: _trained_to(0)})
    selection = Selection(new=_rows(4, 0), old=_rows(4, 0))
    step, score, scores = _best_step(model, result, [10, 20], selection, single=False)
    assert (step, score, scores) == (10, 1.0, {10: 1.0, 20: 0.0})
    assert selection.score(model) == 1.0 and not result.snapshots  # loaded, copies freed


def test_ties_keep_the_shorter_run_and_a_missing_snapshot_is_skipped() -> None:
    from continual.training import TrainResult
    from tasks.train_ewc import _best_step

    selection = Selection(new=_rows(4, 0), old=None)
    tie = TrainResult(snapshots={5: _trained_to(0)})
    assert _best_step(_always(0), tie, [5, 10], selection, single=False)[0] == 5
    resumed = TrainResult(snapshots={})  # a resumed run lacks the steps it did not redo
    assert _best_step(_always(1), resumed, [5, 10], selection, single=False)[:2] == (10, 0.0)


def test_step_plan_stretches_the_run_to_the_largest_share() -> None:
    from continual.training import TrainSettings
    from tasks.train_ewc import step_plan

    settings, steps = step_plan(TrainSettings(steps=300, warmup_steps=30), [2.0, 1.0, 0.001])
    assert steps == [1, 300, 600] and settings.steps == 600 and settings.warmup_steps == 60
    same, only = step_plan(TrainSettings(steps=300), [1.0])
    assert only == [300] and same == TrainSettings(steps=300)
