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

from dataclasses import dataclass, field
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


def history_forgetting(history: list[dict[str, float]]) -> float | None:
    """Forgetting over a history of per-batch accuracy rows keyed by batch id (one row per run):
    mean over earlier batches of (best accuracy in an earlier row − accuracy now); None before
    a batch was measured twice."""
    if len(history) < 2:
        return None
    current, earlier = history[-1], history[:-1]
    drops = [
        max(h[b] for h in earlier if b in h) - current[b]
        for b in current
        if any(b in h for h in earlier)
    ]
    return float(np.mean(drops)) if drops else None


def retention_accuracy(row: dict[str, float], latest: str) -> float | None:
    """Mean accuracy over every batch of `row` but `latest` (None if there is none)."""
    old = [v for b, v in row.items() if b != latest]
    return float(np.mean(old)) if old else None


@dataclass
class MatrixSummary:
    """Continual-learning metrics of an accuracy matrix (see `continual.metrics`)."""

    average_accuracy: float
    forgetting: float
    backward_transfer: float
    forgetting_per_batch: list[float] = field(default_factory=list)


def summarize_matrix(matrix: np.ndarray) -> MatrixSummary:
    """Average accuracy, forgetting and backward transfer of R (NaN where undefined).

    A square matrix (one training step per batch) uses `continual.metrics` as is. A matrix
    with more steps than batches (the demo evaluates after every flow run, including runs that
    train on nothing new) uses the same definitions generalised: the latest row is "now", the
    forgetting of batch j is its best accuracy in an earlier row minus its accuracy now, and
    backward transfer compares now with the first row that measured j (for a square
    lower-triangular R that row is j, so both agree).

    Raises:
        ValueError: R is not 2-D.
    """
    values = np.asarray(matrix, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"accuracy matrix must be 2-D (steps × batches), got shape {values.shape}")
    if values.shape[0] == values.shape[1]:
        return MatrixSummary(
            average_accuracy=average_accuracy(values),
            forgetting=forgetting(values),
            backward_transfer=backward_transfer(values),
            forgetting_per_batch=[float(v) for v in forgetting_per_task(values)],
        )
    return _ragged_summary(values)


def _ragged_summary(values: np.ndarray) -> MatrixSummary:
    """`summarize_matrix` for a steps × batches matrix that is not square."""
    filled_rows = np.flatnonzero(~np.isnan(values).all(axis=1))
    if not len(filled_rows):
        nan = float("nan")
        return MatrixSummary(nan, nan, nan, [nan] * values.shape[1])
    T = int(filled_rows[-1])
    now, earlier = values[T], values[:T]
    seen_before = ~np.isnan(earlier).all(axis=0) if T else np.zeros(values.shape[1], bool)
    best = np.full(values.shape[1], np.nan)
    best[seen_before] = np.nanmax(earlier[:, seen_before], axis=0)
    first = np.full(values.shape[1], np.nan)
    for j in np.flatnonzero(seen_before):
        first[j] = earlier[np.flatnonzero(~np.isnan(earlier[:, j]))[0], j]
    per_batch = best - now
    return MatrixSummary(
        average_accuracy=_nanmean(now),
        forgetting=_nanmean(per_batch),
        backward_transfer=_nanmean(now - first),
        forgetting_per_batch=[float(v) for v in per_batch],
    )
