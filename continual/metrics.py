"""Continual-learning quality metrics over an accuracy matrix, and champion/challenger flips.

R[i][j] is the accuracy on task (landing batch) j after training step i; row T, the latest step
with any entry, is "now". Unset entries are NaN and ignored. Conventions (Chaudhry et al. 2018;
Lopez-Paz & Ranzato 2017):

- average accuracy   mean_{j≤T} R[T][j]
- forgetting of j    max_{i<T} R[i][j] − R[T][j]  (the best it ever was, not the first row), j < T
- backward transfer  mean_{j<T} R[T][j] − R[j][j]  (negative = forgetting)
- relative forgetting (before − after) / before
- negative flip rate  share of all examples the old model got right and the new one gets wrong —
  the regressions users notice even when overall accuracy rises.

Undefined quantities (e.g. forgetting after a single step) are NaN, not 0: "no evidence" must not
read as "no forgetting".
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike


class AccuracyMatrix:
    """An n_tasks × n_tasks accuracy matrix filled as training steps happen.

    Args:
        n_tasks: number of training steps / tasks (rows and columns).

    Raises:
        ValueError: n_tasks < 1.
    """

    def __init__(self, n_tasks: int) -> None:
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
        self.n_tasks = int(n_tasks)
        self.values = np.full((self.n_tasks, self.n_tasks), np.nan)

    def set(self, i: int, j: int, accuracy: float) -> None:
        """Record the accuracy on task j after step i.

        Raises:
            IndexError: i or j outside [0, n_tasks).
            ValueError: accuracy outside [0, 1] or NaN.
        """
        for name, index in (("i", i), ("j", j)):
            if not 0 <= index < self.n_tasks:
                raise IndexError(f"{name}={index} outside [0, {self.n_tasks})")
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"accuracy must be in [0, 1], got {accuracy} for R[{i}][{j}]")
        self.values[i, j] = float(accuracy)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; unset entries become None."""
        rows = [[None if np.isnan(v) else float(v) for v in row] for row in self.values]
        return {"n_tasks": self.n_tasks, "values": rows}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AccuracyMatrix:
        """Inverse of `to_dict`.

        Raises:
            ValueError: the values are not n_tasks × n_tasks.
        """
        matrix = cls(int(data["n_tasks"]))
        values = np.array(
            [[np.nan if v is None else v for v in row] for row in data["values"]], dtype=float
        )
        if values.shape != matrix.values.shape:
            raise ValueError(
                f"accuracy matrix values are {values.shape}, expected {matrix.values.shape}"
            )
        matrix.values = values
        return matrix


def _latest_row(R: ArrayLike) -> tuple[np.ndarray, int]:
    """R as a float matrix and T, the index of its last row holding any value (-1 if none)."""
    matrix = np.asarray(R, dtype=float)
    if matrix.ndim != 2:
        raise ValueError(f"accuracy matrix must be 2-D, got shape {matrix.shape}")
    filled = np.flatnonzero(~np.isnan(matrix).all(axis=1))
    return matrix, int(filled[-1]) if len(filled) else -1


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


def average_accuracy(R: ArrayLike) -> float:
    """Mean accuracy over the tasks seen so far, after the latest step: mean_{j≤T} R[T][j]."""
    matrix, T = _latest_row(R)
    return float("nan") if T < 0 else _nanmean(matrix[T, : T + 1])


def forgetting_per_task(R: ArrayLike) -> np.ndarray:
    """max_{i<T} R[i][j] − R[T][j] for each task j < T (NaN where undefined)."""
    matrix, T = _latest_row(R)
    if T < 1:
        return np.array([], dtype=float)
    past = matrix[:T, :T]
    best = np.full(T, np.nan)
    has_past = ~np.isnan(past).all(axis=0)
    best[has_past] = np.nanmax(past[:, has_past], axis=0)
    forgotten: np.ndarray = best - matrix[T, :T]
    return forgotten


def forgetting(R: ArrayLike) -> float:
    """Average forgetting over tasks j < T (NaN before the second step)."""
    return _nanmean(forgetting_per_task(R))


def backward_transfer(R: ArrayLike) -> float:
    """mean_{j<T} R[T][j] − R[j][j]: how later training changed earlier tasks (NaN if T < 1)."""
    matrix, T = _latest_row(R)
    if T < 1:
        return float("nan")
    return _nanmean(matrix[T, :T] - np.diag(matrix)[:T])


def relative_forgetting(before: float, after: float) -> float:
    """(before − after) / before: the share of an accuracy that was lost.

    Raises:
        ValueError: before <= 0 (no accuracy to lose).
    """
    if not before > 0:
        raise ValueError(f"relative forgetting needs a positive 'before' accuracy, got {before}")
    return (before - after) / before


def negative_flip_rate(old_correct: ArrayLike, new_correct: ArrayLike) -> float:
    """Share of all examples the old model got right and the new model gets wrong.

    Args:
        old_correct, new_correct: per-example correctness (bool or 0/1), same length.

    Raises:
        ValueError: different lengths, no examples, or values other than 0/1.
    """
    old, new = _as_correct(old_correct, "old_correct"), _as_correct(new_correct, "new_correct")
    if old.shape != new.shape:
        raise ValueError(f"old_correct has {old.size} examples but new_correct has {new.size}")
    if old.size == 0:
        raise ValueError("negative flip rate needs at least one example")
    return float(np.mean(old & ~new))


def _as_correct(values: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(values).ravel()
    if array.dtype != bool:
        if not np.isin(array, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans or 0/1, got values {np.unique(array)[:5]}")
        array = array.astype(bool)
    return array
