"""The integrity checks of a feature batch, streamed chunk by chunk (bounded memory).

`validate_batch` runs the Great Expectations suite on the whole batch in one DataFrame, so its
memory grows with the batch (`benchmarks/bench_data_plane.py`, 1M rows × 64 float32 features:
read + GX validation peak 1.3 GB above the process's baseline, `read_batch` alone 0.78 GB at 1M
rows and 0.37 GB at 250k). The integrity verdict does not need the whole frame: every check is a count that adds up over chunks, except duplicates, which need one 64-bit
hash per row (8 bytes a row instead of the row). `scan_integrity` reads the batch with
`landing.iter_batch_frames` (Parquet row groups via `ParquetFile.iter_batches`, CSV and JSON
Lines in chunks) and reaches the same verdict as the generated suite — same failing
expectations, columns and counts — so a batch too large for one worker can be judged before
anything loads it whole.

Scope: the suite generated from the config (`gx_suite.build_suite`), for numeric features; a
hand-edited suite, text columns and the change checks (which need the accepted-data profile)
stay with `validate_batch`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from data_plane.landing import LandingZone, data_columns, iter_batch_frames
from data_plane.messages import Failure, row_count
from data_plane.readers import SOURCE_COLUMN, BatchReadError

if TYPE_CHECKING:
    from evergreen.config import DataConfig

FINITE_MAX = sys.float_info.max
_SAMPLES = 5


@dataclass
class _Tally:
    """Counts over the chunks seen so far (per column: a count and a few sample values)."""

    rows: int = 0
    columns: set[str] = field(default_factory=set)
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    samples: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    hashes: list[np.ndarray] = field(default_factory=list)

    def add(self, kind: str, column: str, bad: pd.Series) -> None:
        """Count the values of `bad` (the offending values of one chunk) against `kind`."""
        if bad.empty:
            return
        key = (kind, column)
        self.counts[key] = self.counts.get(key, 0) + len(bad)
        seen = self.samples.setdefault(key, [])
        seen.extend(v for v in dict.fromkeys(bad.tolist()) if v not in seen)
        del seen[_SAMPLES:]


def _non_numeric(values: pd.Series) -> pd.Series:
    """Present values that are not numbers (text in a numeric column, e.g. "abc" in a CSV)."""
    if pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values):
        return values.iloc[:0]
    present = values.dropna()
    return present[pd.to_numeric(present, errors="coerce").isna()]


def _feature_checks(tally: _Tally, chunk: pd.DataFrame, feature: str, cfg: DataConfig) -> None:
    values = chunk[feature]
    tally.add("expect_column_values_to_not_be_null", feature, values[values.isna()])
    text = _non_numeric(values)
    tally.add("expect_column_values_to_be_in_type_list", feature, text)
    numbers = pd.to_numeric(values.drop(text.index), errors="coerce").dropna().astype("float64")
    low, high = cfg.feature_bounds.get(feature, (-FINITE_MAX, FINITE_MAX))
    outside = numbers[(numbers < float(low)) | (numbers > float(high))]
    tally.add("expect_column_values_to_be_between", feature, outside)


def _row_hashes(chunk: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """One uint64 per row over `columns`, numbers as float64 so that chunks whose dtypes differ
    (an int chunk, a float chunk of one CSV column) hash equal values alike."""
    frame = chunk[columns].copy()
    for column in columns:
        numbers = pd.to_numeric(frame[column], errors="coerce")
        if numbers.notna().sum() == frame[column].notna().sum():
            frame[column] = numbers.astype("float64")
        else:
            frame[column] = frame[column].astype(str)
    hashes: np.ndarray = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    return hashes


def _observe(tally: _Tally, chunk: pd.DataFrame, cfg: DataConfig) -> None:
    tally.rows += len(chunk)
    for feature in cfg.features:
        if feature in chunk.columns:
            _feature_checks(tally, chunk, feature, cfg)
    label = cfg.label
    if label in chunk.columns:
        labels = chunk[label]
        tally.add("expect_column_values_to_not_be_null", label, labels[labels.isna()])
        present = labels.dropna()
        unknown = present[~present.isin(list(cfg.classes))]
        tally.add("expect_column_values_to_be_in_set", label, unknown)
    columns = data_columns(cfg)
    if all(c in chunk.columns for c in columns):
        tally.hashes.append(_row_hashes(chunk, columns))


def _duplicates(hashes: Iterable[np.ndarray]) -> int:
    """Rows whose content occurs more than once, every copy counted (as GX's compound check)."""
    parts = list(hashes)
    if not parts:
        return 0
    _, inverse, counts = np.unique(np.concatenate(parts), return_inverse=True, return_counts=True)
    return int((counts[inverse] > 1).sum())


def _failures(tally: _Tally, cfg: DataConfig) -> list[Failure]:
    """The failures in the suite's order: existence, per-feature, label, rows, duplicates."""
    found: list[Failure] = []
    columns = data_columns(cfg)
    missing = [c for c in columns if c not in tally.columns]
    for column in missing:
        message = f"{column!r} is missing"
        found.append(Failure("expect_table_columns_to_match_set", column, None, [], message))
    mistyped = {c for (k, c) in tally.counts if k == "expect_column_values_to_be_in_type_list"}
    kinds = [
        "expect_column_values_to_be_in_type_list",
        "expect_column_values_to_not_be_null",
        "expect_column_values_to_be_between",
        "expect_column_values_to_be_in_set",
    ]
    for column in [*cfg.features, cfg.label]:
        for kind in kinds:
            count = tally.counts.get((kind, column))
            if count is None or (kind.endswith("between") and column in mistyped):
                continue  # GX cannot compare text: the type failure is the cause
            samples = tally.samples.get((kind, column), [])
            message = f"column {column!r}: {row_count(count)} fail {kind} (e.g. {samples})"
            found.append(Failure(kind, column, count, samples, message))
    if not cfg.min_rows <= tally.rows <= cfg.max_rows:
        message = f"{row_count(tally.rows)}; expected between {cfg.min_rows} and {cfg.max_rows}"
        found.append(Failure("expect_table_row_count_to_be_between", None, None, [], message))
    duplicates = _duplicates(tally.hashes) if not missing else 0
    if tally.rows and duplicates / tally.rows > cfg.max_duplicate_fraction:
        message = f"{duplicates} rows are exact duplicates (every copy counted)"
        found.append(Failure("expect_compound_columns_to_be_unique", None, duplicates, [], message))
    extra = sorted(tally.columns - set(columns) - {SOURCE_COLUMN})
    if extra and cfg.extra_columns != "ignore":
        message = f"the files hold columns the config does not list: {extra[:10]}"
        found.append(
            Failure("expect_table_columns_to_match_set", None, len(extra), extra[:5], message)
        )
    return found


def scan_integrity(
    zone: LandingZone, batch_id: str, data_cfg: DataConfig, *, chunk_rows: int = 65_536
) -> list[Failure]:
    """The blocking integrity failures of a feature batch, read `chunk_rows` rows at a time.

    Memory: one chunk plus 8 bytes per row (duplicate hashes). An empty list means the batch
    passes the generated suite; the failures name the same expectations, columns and counts as
    `validate_batch` would.

    Raises:
        BatchReadError: the batch cannot be read (as `read_batch`).
        ValueError: a text config (use `validate_batch`).
    """
    if data_cfg.text:
        raise ValueError("scan_integrity checks numeric features; text batches: validate_batch")
    tally = _Tally()
    chunks = iter_batch_frames(
        zone, batch_id, data_columns(data_cfg), chunk_rows=chunk_rows, seen_columns=tally.columns
    )
    for chunk in chunks:
        _observe(tally, chunk, data_cfg)
    return _failures(tally, data_cfg)


__all__ = ["BatchReadError", "scan_integrity"]
