"""Continual-learning metrics on hand-computed accuracy matrices."""

from __future__ import annotations

import json

import numpy as np
import pytest

from continual.metrics import (
    AccuracyMatrix,
    average_accuracy,
    backward_transfer,
    forgetting,
    forgetting_per_task,
    negative_flip_rate,
    relative_forgetting,
)

NAN = float("nan")
# Task 0 improved after step 1 (0.8 → 0.9) before falling to 0.6: forgetting must use the best
# accuracy (0.9), not the first row (0.8). R[0][1] = 0.1 is task 1 before it was trained on.
R = np.array(
    [
        [0.8, 0.1, NAN],
        [0.9, 0.7, NAN],
        [0.6, 0.5, 0.9],
    ]
)


def test_average_accuracy_is_the_mean_of_the_last_row() -> None:
    assert average_accuracy(R) == pytest.approx((0.6 + 0.5 + 0.9) / 3)


def test_forgetting_uses_the_best_past_accuracy_not_the_first_row() -> None:
    np.testing.assert_allclose(forgetting_per_task(R), [0.9 - 0.6, 0.7 - 0.5])
    assert forgetting(R) == pytest.approx((0.3 + 0.2) / 2)
    first_row_version = ((0.8 - 0.6) + (0.1 - 0.5)) / 2
    assert forgetting(R) != pytest.approx(first_row_version)


def test_backward_transfer_compares_with_the_diagonal() -> None:
    assert backward_transfer(R) == pytest.approx(((0.6 - 0.8) + (0.5 - 0.7)) / 2)
    improved = np.array([[0.5, NAN], [0.7, 0.9]])
    assert backward_transfer(improved) == pytest.approx(0.2)
    assert forgetting(improved) == pytest.approx(-0.2)  # negative forgetting = it got better


def test_partially_filled_matrix_uses_the_latest_filled_row() -> None:
    matrix = AccuracyMatrix(4)
    matrix.set(0, 0, 0.9)
    matrix.set(1, 0, 0.85)
    matrix.set(1, 1, 0.8)
    matrix.set(1, 3, 0.2)  # a task not trained yet does not count in the average
    assert average_accuracy(matrix.values) == pytest.approx((0.85 + 0.8) / 2)
    assert forgetting(matrix.values) == pytest.approx(0.05)
    assert backward_transfer(matrix.values) == pytest.approx(-0.05)


def test_undefined_metrics_are_nan_not_zero() -> None:
    one_step = np.array([[0.9, NAN], [NAN, NAN]])
    assert np.isnan(forgetting(one_step)) and np.isnan(backward_transfer(one_step))
    assert forgetting_per_task(one_step).size == 0
    assert np.isnan(average_accuracy(np.full((2, 2), NAN)))


def test_accuracy_matrix_round_trips_through_json() -> None:
    matrix = AccuracyMatrix(3)
    for (i, j), value in np.ndenumerate(R):
        if not np.isnan(value):
            matrix.set(i, j, value)
    restored = AccuracyMatrix.from_dict(json.loads(json.dumps(matrix.to_dict())))
    np.testing.assert_array_equal(restored.values, R)
    with pytest.raises(IndexError):
        matrix.set(3, 0, 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        matrix.set(0, 0, 1.5)
    with pytest.raises(ValueError, match="expected"):
        AccuracyMatrix.from_dict({"n_tasks": 2, "values": [[0.1]]})


def test_relative_forgetting() -> None:
    assert relative_forgetting(0.8, 0.6) == pytest.approx(0.25)
    assert relative_forgetting(0.8, 0.9) == pytest.approx(-0.125)
    with pytest.raises(ValueError, match="positive"):
        relative_forgetting(0.0, 0.5)


def test_negative_flip_rate_counts_old_right_new_wrong_over_all_examples() -> None:
    old = [1, 1, 1, 0, 0, 1]
    new = [1, 0, 0, 1, 0, 1]
    assert negative_flip_rate(old, new) == pytest.approx(2 / 6)
    assert negative_flip_rate(np.array(old, bool), np.array(old, bool)) == 0.0
    # accuracy went up, yet users still see regressions
    assert negative_flip_rate([1, 0, 0, 0], [0, 1, 1, 1]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="examples"):
        negative_flip_rate([1, 0], [1])
    with pytest.raises(ValueError, match="0/1"):
        negative_flip_rate([0.5, 1], [1, 1])
