"""Per-class precision, recall and the confusion matrix of one classifier on labelled rows.

The gate decides on paired accuracy; people reading a decision also want to know *which* classes
a challenger got better or worse at. Pure numpy on class indices (the logit order of
`spec.classes`), so it is tested against scikit-learn without any server.

Conventions (as scikit-learn's `zero_division=0`): a class never predicted has precision 0, a
class absent from the labels has recall 0; `support` says which of the two it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike


@dataclass(frozen=True)
class ClassReport:
    """One model's per-class scores on one set of rows.

    Attributes:
        classes: class labels, in logit order.
        confusion: [C, C] counts, row = true class, column = predicted class.
    """

    classes: tuple[Any, ...]
    confusion: np.ndarray

    @property
    def support(self) -> np.ndarray:
        """Rows per true class."""
        return np.asarray(self.confusion.sum(axis=1))

    @property
    def precision(self) -> np.ndarray:
        """Correct / predicted, per class (0 where the class was never predicted)."""
        return _ratio(np.diag(self.confusion), self.confusion.sum(axis=0))

    @property
    def recall(self) -> np.ndarray:
        """Correct / true, per class (0 where the class has no rows)."""
        return _ratio(np.diag(self.confusion), self.confusion.sum(axis=1))

    @property
    def accuracy(self) -> float:
        total = int(self.confusion.sum())
        return float(np.trace(self.confusion) / total) if total else float("nan")

    def metrics(self, prefix: str) -> dict[str, float]:
        """Flat metrics: `<prefix>.precision.<class>`, `<prefix>.recall.<class>`, accuracy."""
        out = {f"{prefix}.accuracy": self.accuracy}
        for i, label in enumerate(self.classes):
            out[f"{prefix}.precision.{label}"] = float(self.precision[i])
            out[f"{prefix}.recall.{label}"] = float(self.recall[i])
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One record per class (class, precision, recall, support): a table for people."""
        return [
            {
                "class": str(label),
                "precision": float(self.precision[i]),
                "recall": float(self.recall[i]),
                "support": int(self.support[i]),
            }
            for i, label in enumerate(self.classes)
        ]


def class_report(y_true: ArrayLike, y_pred: ArrayLike, classes: list[Any]) -> ClassReport:
    """Confusion matrix and per-class scores of predicted class indices against the labels.

    Args:
        y_true, y_pred: class indices [N] (0 ≤ index < len(classes)).
        classes: the labels, in logit order.

    Raises:
        ValueError: the arrays differ in length, or an index is outside the classes.
    """
    true = np.asarray(y_true, dtype=np.int64).ravel()
    pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if true.shape != pred.shape:
        raise ValueError(f"y_true has {true.size} rows but y_pred {pred.size}")
    n = len(classes)
    for name, values in (("y_true", true), ("y_pred", pred)):
        if values.size and (values.min() < 0 or values.max() >= n):
            raise ValueError(f"{name} holds class indices outside 0..{n - 1} ({classes})")
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (true, pred), 1)
    return ClassReport(tuple(classes), confusion)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.zeros(numerator.shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out
