"""Turning Great Expectations results into messages a person can act on (used by `validation`).

GX says "expect_column_values_to_be_between failed, unexpected_count 3"; the report should say
"column 'f7': 3 values outside [-4.1, 5.2] (e.g. inf, 1e9) in part-00001.csv — if the change
is real, widen the bounds in the suite". Follow-on failures (checks that could not run because
the column is missing or holds text) are dropped from the list; the raw GX result keeps them.

This module walks the GX result: which failed checks to report, per column where GX judged per
row. The sentence for each is `data_plane.failure_text`'s; the report they go into,
`data_plane.validation_report`'s. Both modules' public names are re-exported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from data_plane.failure_text import (
    CONTINUOUS_DISTINCT,
    SAMPLES,
    failure_message,
    files_of,
    missing_values,
    non_numeric,
    repeated_rows,
    row_count,
    type_message,
)
from data_plane.landing import data_columns
from data_plane.readers import SOURCE_COLUMN
from data_plane.validation_report import (
    CHANGE_LINE_COLUMNS,
    RANGE_CHANGE,
    Failure,
    ValidationReport,
    change_lines,
    clip_middle,
    render_summary,
)

if TYPE_CHECKING:
    from evergreen.config import DataConfig

# the public names, the report's and the sentences' included (a strict mypy re-exports only what
# is listed here)
__all__ = [
    "CHANGE_LINE_COLUMNS",
    "CONTINUOUS_DISTINCT",
    "FINITE_NUMBERS",
    "KIND_BETWEEN",
    "KIND_NULL",
    "KIND_TYPE",
    "RANGE_CHANGE",
    "Failure",
    "ValidationReport",
    "batch_statistics",
    "change_lines",
    "clip_middle",
    "compact_result",
    "failures_from_result",
    "is_real_number",
    "render_summary",
    "row_count",
    "unexpected_rows",
]

FINITE_NUMBERS = "expect_multicolumn_values_to_be_finite_numbers"  # data_plane.gx_expectations
# the per-column checks it replaces: its failures keep their kinds (reports, the chunked scan)
KIND_NULL = "expect_column_values_to_not_be_null"
KIND_TYPE = "expect_column_values_to_be_in_type_list"
KIND_BETWEEN = "expect_column_values_to_be_between"


def _exception_message(info: Any) -> str | None:
    """GX nests exception info per metric in 1.x; return the first message, if any."""
    if not isinstance(info, dict):
        return None
    if "raised_exception" in info:
        return info.get("exception_message") if info.get("raised_exception") else None
    for nested in info.values():
        message = _exception_message(nested)
        if message:
            return message
    return None


def unexpected_rows(
    kind: str, kwargs: dict[str, Any], frame: pd.DataFrame, limit: int = 10
) -> list[int]:
    """Positions of the first `limit` rows a failed column check objects to, found in the frame
    (GX reports them only with the costlier SUMMARY result format); [] for other checks.

    Only for naming the files a failure is in: the verdict and the counts are GX's.
    """
    column = kwargs.get("column")
    if column is not None and column not in frame.columns:
        return []
    values = frame[column] if column is not None else None
    if kind == "expect_column_values_to_not_be_null" and values is not None:
        mask = values.isna()
    elif kind == "expect_column_values_to_be_between" and values is not None:
        numbers = pd.to_numeric(values, errors="coerce")
        low, high = kwargs.get("min_value"), kwargs.get("max_value")
        outside = pd.Series(False, index=frame.index)
        if isinstance(low, int | float):
            outside |= numbers < low
        if isinstance(high, int | float):
            outside |= numbers > high
        mask = outside & values.notna()
    elif kind == "expect_column_values_to_be_in_set" and values is not None:
        mask = values.notna() & ~values.isin(list(kwargs.get("value_set") or []))
    elif kind == "expect_compound_columns_to_be_unique":
        present = [c for c in kwargs.get("column_list", []) if c in frame.columns]
        if not present:
            return []
        mask = frame.duplicated(subset=present, keep=False)
    else:
        return []
    return [int(i) for i in np.flatnonzero(mask.to_numpy())[:limit]]


def _failed_columns(results: list[dict[str, Any]], kind: str) -> set[str]:
    return {
        item["expectation_config"]["kwargs"].get("column")
        for item in results
        if not item["success"] and item["expectation_config"]["type"] == kind
    }


def _missing_columns(results: list[dict[str, Any]], frame: pd.DataFrame) -> set[str]:
    """Columns a failed existence check names: `expect_column_to_exist` (suites written before
    the table-level check) or `expect_table_columns_to_match_set` (its set minus the batch's)."""
    missing = _failed_columns(results, "expect_column_to_exist")
    for item in results:
        config = item["expectation_config"]
        if not item["success"] and config["type"] == "expect_table_columns_to_match_set":
            missing.update(_absent_columns(config["kwargs"], frame))
    return missing


def _absent_columns(kwargs: dict[str, Any], frame: pd.DataFrame) -> list[str]:
    """The columns of a table-level check's `column_set` that the batch lacks."""
    return [str(c) for c in kwargs.get("column_set") or [] if c not in frame.columns]


def _is_consequence(
    kind: str, involved: set[str], missing: set[str], mistyped: set[str], error: str | None
) -> bool:
    """A check that failed only because its column is missing, or could not run on a wrongly
    typed column, is a consequence: the cause is reported once."""
    if kind in ("expect_column_to_exist", "expect_table_columns_to_match_set"):
        return False
    return bool(involved & missing) or bool(error and involved & mistyped)


def failures_from_result(
    result: dict[str, Any], frame: pd.DataFrame, data_cfg: DataConfig
) -> list[Failure]:
    """Actionable `Failure`s from a GX validation result (in suite order)."""

    results = result.get("results", [])
    missing = _missing_columns(results, frame)
    mistyped = _failed_columns(results, "expect_column_values_to_be_in_type_list")
    mistyped |= _mistyped_in_multicolumn(results, frame)
    failures = []
    for item in results:
        if item["success"]:
            continue
        config = item["expectation_config"]
        kind, kwargs = config["type"], dict(config["kwargs"])
        column = kwargs.get("column")
        involved = {column, *kwargs.get("column_list", [])} - {None}
        error = _exception_message(item.get("exception_info"))
        severity = str(config.get("severity") or "critical")
        if kind == FINITE_NUMBERS and (not error or involved & missing):
            # GX's verdict is per row; the person fixing the data needs it per column. With a
            # column missing GX cannot run it: the present columns are still reported
            failures += _finite_failures(kwargs, frame, data_cfg, severity)
            continue
        if _is_consequence(kind, involved, missing, mistyped, error):
            continue
        if kind == "expect_table_columns_to_match_set" and not error:
            failures += _missing_failures(kind, kwargs, frame, data_cfg, severity)
            continue
        res = item.get("result") or {}
        count = res.get("unexpected_count")
        samples = list(res.get("partial_unexpected_list") or [])[:SAMPLES]
        if error:
            target = column or sorted(involved) or "the table"
            message = f"{kind} on {target} could not run: {error}"
        else:
            ctx = {
                "frame": frame,
                "cfg": data_cfg,
                "count": count,
                "where": files_of(frame, _failed_rows(kind, kwargs, res, frame)),
                "meta": config.get("meta"),
            }
            message = failure_message(kind, column, kwargs, res, ctx)
        if kind == "expect_column_values_to_be_in_type_list" and column in data_cfg.features:
            bad = non_numeric(frame, column) if column in frame.columns else None
            if bad is not None:
                samples, count = list(dict.fromkeys(bad.tolist()))[:SAMPLES], len(bad)
        failures.append(Failure(kind, column, count, samples, message, severity))
    return failures


def _mistyped_in_multicolumn(results: list[dict[str, Any]], frame: pd.DataFrame) -> set[str]:
    """Columns a failed finite-numbers check objects to for holding non-numbers (text, bools)."""
    mistyped: set[str] = set()
    for item in results:
        config = item["expectation_config"]
        if item["success"] or config["type"] != FINITE_NUMBERS:
            continue
        for column in config["kwargs"].get("column_list") or []:
            if column in frame.columns and len(_not_numbers(frame[column])):
                mistyped.add(column)
    return mistyped


def _not_numbers(values: pd.Series) -> pd.Series:
    """Present values that are not real numbers (the finite-numbers check's type question)."""
    present = values.dropna()
    if pd.api.types.is_bool_dtype(present.dtype):
        return present
    if pd.api.types.is_numeric_dtype(present.dtype):
        return present.iloc[:0]
    return present[~present.map(is_real_number)]


def is_real_number(value: Any) -> bool:
    """A number for the finite-numbers check: ints and floats (numpy's too), not bools."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def _finite_failures(
    kwargs: dict[str, Any], frame: pd.DataFrame, cfg: DataConfig, severity: str
) -> list[Failure]:
    """A failed `expect_multicolumn_values_to_be_finite_numbers`, one failure per column and
    problem, with the kinds and messages of the per-column checks it replaces (null, type,
    ±inf); ±inf in a column with declared bounds is left to that column's between check."""
    found: list[Failure] = []
    for column in kwargs.get("column_list") or []:
        if column not in frame.columns:
            continue
        values = frame[column]
        nulls = values[values.isna()]
        if len(nulls):
            where = files_of(frame, nulls.index.tolist()[:10])
            message = f"column {column!r} has {missing_values(len(nulls))}{where}; expected none"
            found.append(
                Failure(KIND_NULL, column, len(nulls), nulls.tolist()[:SAMPLES], message, severity)
            )
        odd = _not_numbers(values)
        if len(odd):
            message = type_message(frame, column, {"type_list": "numbers"}, {}, cfg)
            bad = non_numeric(frame, column)
            shown = bad if len(bad) else odd
            samples = list(dict.fromkeys(shown.tolist()))[:SAMPLES]
            found.append(Failure(KIND_TYPE, column, len(shown), samples, message, severity))
            continue  # ±inf of a text column is not asked
        if column in cfg.feature_bounds:
            continue
        numbers = values.to_numpy(dtype=float, na_value=np.nan)
        infinite = values[np.isinf(numbers)]
        if len(infinite):
            where = files_of(frame, infinite.index.tolist()[:10])
            message = (
                f"column {column!r} has {len(infinite)} non-finite values (±inf){where}; "
                "expected finite numbers"
            )
            samples = infinite.tolist()[:SAMPLES]
            found.append(Failure(KIND_BETWEEN, column, len(infinite), samples, message, severity))
    return found


def _failed_rows(
    kind: str, kwargs: dict[str, Any], result: dict[str, Any], frame: pd.DataFrame
) -> list[Any]:
    """Rows of a failure: GX's (SUMMARY) when it gave them, else found in the frame."""
    rows = result.get("partial_unexpected_index_list")
    return list(rows) if rows is not None else unexpected_rows(kind, kwargs, frame)


def _missing_failures(
    kind: str,
    kwargs: dict[str, Any],
    frame: pd.DataFrame,
    data_cfg: DataConfig,
    severity: str,
) -> list[Failure]:
    """One failure per configured column the batch lacks (the table-level check names many)."""
    columns = _absent_columns(kwargs, frame)
    ctx = {"frame": frame, "cfg": data_cfg, "count": None, "where": ""}
    return [
        Failure(kind, column, None, [], failure_message(kind, column, kwargs, {}, ctx), severity)
        for column in columns
    ]


def batch_statistics(frame: pd.DataFrame, data_cfg: DataConfig) -> dict[str, Any]:
    """Counts worth keeping with the report: rows per file, classes, nulls, duplicates."""
    present = [c for c in data_columns(data_cfg) if c in frame.columns]
    stats: dict[str, Any] = {"n_rows": len(frame), "n_columns": len(present)}
    if SOURCE_COLUMN in frame.columns:
        stats["rows_per_file"] = frame[SOURCE_COLUMN].value_counts().sort_index().to_dict()
    if data_cfg.label in frame.columns:
        counts = frame[data_cfg.label].value_counts(dropna=False)
        stats["class_counts"] = {str(k): int(v) for k, v in counts.items()}
    nulls = frame[present].isna().sum()
    stats["null_counts"] = {str(k): int(v) for k, v in nulls[nulls > 0].items()}
    repeats = repeated_rows(frame, present)
    stats["duplicate_rows"] = repeats
    stats["duplicate_fraction"] = repeats / len(frame) if len(frame) else 0.0
    return stats


def compact_result(result: dict[str, Any]) -> dict[str, Any]:
    """The GX result for the record: failed checks in full (minus tracebacks, which belong in
    logs), passed ones as type + column only (the arguments are in the suite file)."""
    compact = dict(result)
    compact["results"] = []
    for item in result.get("results", []):
        config = item["expectation_config"]
        if item["success"]:
            entry = {"success": True, "type": config["type"]}
            if "column" in config["kwargs"]:
                entry["column"] = config["kwargs"]["column"]
        else:
            entry = dict(item)
            message = _exception_message(item.get("exception_info"))
            entry["exception_info"] = {"exception_message": message} if message else None
        compact["results"].append(entry)
    return compact
