"""What the accepted data looked like so far, and the one change rule that blocks by default.

Continual learning exists because the data changes, so a value beyond what was seen before is
*change*, not corruption: it is reported, never blocked (unless the user declared the bound in
`data.feature_bounds`, or opted in with `data.change.block`). The profile collects, over every
batch accepted so far, each numeric feature's accepted range (the lowest 0.1 % and highest 99.9 %
quantile any accepted batch reached) and the class counts. It widens as data is accepted and
never narrows.

Gross breakage is the exception that blocks by default: a batch in which *most* features moved
far outside everything accepted, the signature of a producer that switched units (every value
×16, seconds → milliseconds, °C → K), not of new writers or a drifting sensor. The rule:

- a feature's envelope is its accepted range widened on both sides by one `range_factor` ×
  its width, the width floored at the median width of all features (so a feature that was
  constant so far gets a sensible envelope instead of a zero-width one);
- a feature is *displaced* when at least `value_share` (25 %) of the batch's values lie outside
  its envelope;
- the batch is grossly broken when at least `displaced_share` (50 %) of the features are
  displaced.

Measured on scikit-learn digits with the first 500 scans as the accepted data: rotations by
45°, 2-pixel shifts, thicker strokes, gain ×1.5, pixel permutations and a single shifted
column displace no feature; ×16 displaces 64 % of the features, +273 all of them, ×2 none.
A genuine shift this large exists (a first batch from summer, then winter readings on every
sensor); the quarantine message says how to accept it (`data.change.gross_change=false` for
one forced run), and once accepted the profile widens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

LOW_QUANTILE, HIGH_QUANTILE = 0.001, 0.999


@dataclass
class FeatureRange:
    """The accepted range of one numeric feature, over every accepted batch."""

    low: float
    high: float


@dataclass
class DataProfile:
    """Accepted ranges per feature, class counts and batch count of the data accepted so far."""

    ranges: dict[str, FeatureRange] = field(default_factory=dict)
    class_counts: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    rows: int = 0
    # content digest of each accepted batch (its rows as a multiset) → the batch's id
    digests: dict[str, str] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.batches == 0

    def updated(
        self,
        frame: pd.DataFrame,
        features: Iterable[str],
        label: str,
        *,
        batch_id: str | None = None,
        columns: list[str] | None = None,
    ) -> DataProfile:
        """A new profile that also covers `frame` (an accepted batch); self is not changed.

        With `batch_id`, the batch's content digest over `columns` (default: the features and
        the label) is remembered, so the same rows landed again under another id are found
        (`repeated_batch`)."""
        features = list(features)
        digests = dict(self.digests)
        if batch_id is not None:
            digests.setdefault(batch_digest(frame, columns or [*features, label]), batch_id)
        ranges = {name: FeatureRange(r.low, r.high) for name, r in self.ranges.items()}
        for name in features:
            values = _finite(frame[name])
            if values.size == 0:
                continue
            low, high = np.quantile(values, [LOW_QUANTILE, HIGH_QUANTILE])
            known = ranges.get(name)
            if known is None:
                ranges[name] = FeatureRange(float(low), float(high))
            else:
                ranges[name] = FeatureRange(
                    min(known.low, float(low)), max(known.high, float(high))
                )
        counts = dict(self.class_counts)
        for value, count in frame[label].map(label_key).value_counts().items():
            counts[str(value)] = counts.get(str(value), 0) + int(count)
        return DataProfile(ranges, counts, self.batches + 1, self.rows + len(frame), digests)

    def repeated_batch(self, frame: pd.DataFrame, batch_id: str, columns: list[str]) -> str | None:
        """The id of an accepted batch whose rows are exactly `frame`'s (in any row or column
        order) under another id — a batch landed twice —, else None."""
        if not self.digests:
            return None
        first = self.digests.get(batch_digest(frame, columns))
        return first if first is not None and first != batch_id else None

    def to_json(self) -> str:
        return json.dumps(
            {
                "ranges": {n: [r.low, r.high] for n, r in self.ranges.items()},
                "class_counts": self.class_counts,
                "batches": self.batches,
                "rows": self.rows,
                "digests": self.digests,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> DataProfile:
        data = json.loads(text)
        ranges = {n: FeatureRange(float(lo), float(hi)) for n, (lo, hi) in data["ranges"].items()}
        counts = {str(k): int(v) for k, v in data.get("class_counts", {}).items()}
        digests = {str(k): str(v) for k, v in data.get("digests", {}).items()}
        return cls(ranges, counts, int(data.get("batches", 0)), int(data.get("rows", 0)), digests)


def batch_digest(frame: pd.DataFrame, columns: list[str]) -> str:
    """A batch's rows over `columns` as a multiset: row order, column order and dtypes aside."""
    from data_plane.splits import content_hash

    return content_hash(frame, sorted(columns, key=str))[:32]


def _finite(series: pd.Series) -> np.ndarray:
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    finite: np.ndarray = values[np.isfinite(values)]
    return finite


def label_key(value: Any) -> str:
    """Canonical string for a label, so 3, 3.0, "3" and np.int64(3) all match class 3."""
    if isinstance(value, float | np.floating) and np.isfinite(value) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def canonical_labels(labels: pd.Series, classes: list[Any]) -> pd.Series:
    """`labels` with every value that names a class in another type replaced by that class:
    "2" (quoted by a JSON producer) or 2.0 → 2, a boolean True/False → 1/0 for classes [0, 1].
    Validation checks labels against `data.classes` by equality and training by `label_key`,
    so without this "2" was quarantined although it is class 2, and True passed validation
    (True == 1) and then failed training. Other values (unknown labels, nulls) are kept as they
    are, for validation to report."""
    lookup = {label_key(c): c for c in classes}
    uniques = labels.dropna().unique()
    mapping: dict[Any, Any] = {}
    for value in uniques:
        key = label_key(value)
        if key not in lookup and isinstance(value, bool | np.bool_):
            key = str(int(value))
        target = lookup.get(key)
        if target is not None and not _is_class(value, target):
            mapping[value] = target
    if not mapping:
        return labels
    codes, found = pd.factorize(labels)  # nulls get code -1: the appended None
    values = np.array([mapping.get(v, v) for v in found] + [None], dtype=object)
    out = pd.Series(values[codes], index=labels.index, name=labels.name)
    if (codes < 0).any():
        out = out.where(codes >= 0, labels)  # a null stays the null it was
    return out.infer_objects()


def _is_class(value: Any, target: Any) -> bool:
    """Whether label `value` already is class `target`: equal and of the same type, a numpy
    scalar read as the Python value it holds (np.int64(2) is class 2, so an int64 label column
    is not rebuilt every batch; "2" and 2.0 are not). A boolean is only ever the same boolean:
    np.True_ still becomes True, and True the class 1."""
    if isinstance(value, np.generic) and not isinstance(value, np.bool_):
        value = value.item()
    return type(value) is type(target) and bool(value == target)


@dataclass(frozen=True)
class GrossChangeRule:
    """Thresholds of the gross-breakage rule (see the module docstring)."""

    range_factor: float = 1.0
    value_share: float = 0.25
    displaced_share: float = 0.5


@dataclass
class GrossChange:
    """The rule's verdict on one batch: which features moved far outside the accepted data."""

    broken: bool
    displaced: dict[str, float]  # feature -> share of its values outside the envelope
    n_features: int
    rule: GrossChangeRule

    def message(self) -> str:
        """One actionable sentence (the quarantine reason, or what was checked)."""
        share = len(self.displaced) / max(self.n_features, 1)
        worst = sorted(self.displaced.items(), key=lambda kv: -kv[1])[:5]
        examples = ", ".join(f"{n!r} {s:.0%}" for n, s in worst)
        if not self.broken:
            return (
                f"{len(self.displaced)} of {self.n_features} features moved far outside the "
                f"accepted data ({share:.0%} < {self.rule.displaced_share:.0%}): not gross breakage"
            )
        return (
            f"{len(self.displaced)} of {self.n_features} features ({share:.0%}) have at least "
            f"{self.rule.value_share:.0%} of their values more than {self.rule.range_factor:g}× "
            f"their accepted range beyond everything accepted so far (e.g. {examples}) — a "
            "batch-wide jump like a producer switching units (×16, s → ms); fix the export, or if "
            "the change is real, accept it once with `--force --set data.change.gross_change=false`"
        )


def gross_change(
    frame: pd.DataFrame,
    profile: DataProfile,
    features: Iterable[str],
    rule: GrossChangeRule = GrossChangeRule(),
) -> GrossChange:
    """Apply the gross-breakage rule to a batch (features without an accepted range are skipped)."""
    names = [n for n in features if n in profile.ranges and n in frame.columns]
    widths = np.array([profile.ranges[n].high - profile.ranges[n].low for n in names])
    floor = float(np.median(widths)) if widths.size else 0.0
    displaced: dict[str, float] = {}
    for name, width in zip(names, widths, strict=True):
        values = _finite(frame[name])
        if values.size == 0:
            continue
        known = profile.ranges[name]
        margin = rule.range_factor * max(float(width), floor, np.finfo(float).tiny)
        outside = float(np.mean((values < known.low - margin) | (values > known.high + margin)))
        if outside >= rule.value_share:
            displaced[name] = outside
    broken = bool(names) and len(displaced) / len(names) >= rule.displaced_share
    return GrossChange(broken, displaced, len(names), rule)


def class_mix_change(frame: pd.DataFrame, profile: DataProfile, label: str) -> dict[str, Any]:
    """How the batch's class mix differs from the accepted data's (informational).

    Returns the classes never accepted before, and the total variation distance between the
    two class distributions (0 = same mix, 1 = disjoint).
    """
    batch = frame[label].map(label_key).value_counts(normalize=True)
    total = sum(profile.class_counts.values())
    if total == 0:
        return {"new_classes": [], "total_variation": 0.0}
    seen = {k: v / total for k, v in profile.class_counts.items()}
    keys = set(seen) | set(batch.index.astype(str))
    distance = 0.5 * sum(abs(seen.get(k, 0.0) - float(batch.get(k, 0.0))) for k in keys)
    new = sorted(str(k) for k in batch.index if str(k) not in profile.class_counts)
    return {"new_classes": new, "total_variation": round(float(distance), 4)}
