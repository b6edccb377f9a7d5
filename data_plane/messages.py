"""Turning Great Expectations results into messages a person can act on (used by `validation`).

GX says "expect_column_values_to_be_between failed, unexpected_count 3"; the report should say
"column 'f7': 3 values outside [-4.1, 5.2] (e.g. inf, 1e9) in part-00001.csv — if the change
is real, widen the bounds in the suite". Follow-on failures (checks that could not run because
the column is missing or holds text) are dropped from the list; the raw GX result keeps them.
"""

from __future__ import annotations

import difflib
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from data_plane.landing import COLUMNS_IN_FILES_ATTR, data_columns
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

# the public names, the report's included (a strict mypy re-exports only what is listed here)
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

_FINITE_MAX = sys.float_info.max
_SAMPLES = 5
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


def _files(frame: pd.DataFrame, rows: list[Any]) -> str:
    if SOURCE_COLUMN not in frame.columns or not rows:
        return ""
    valid = [r for r in rows if isinstance(r, int) and 0 <= r < len(frame)]
    names = sorted(set(frame[SOURCE_COLUMN].iloc[valid].astype(str)))
    return f" in {', '.join(names)}" if names else ""


def _counts(result: dict[str, Any]) -> str:
    """The sample values with their counts: GX's SUMMARY `partial_unexpected_counts`, or (BASIC,
    what `validation` asks for) the same tally of `partial_unexpected_list`, most common first."""
    pairs = result.get("partial_unexpected_counts")
    if pairs is None:
        tally = Counter(_hashable(v) for v in result.get("partial_unexpected_list") or [])
        pairs = [{"value": value, "count": count} for value, count in tally.most_common()]
    return ", ".join(f"{p['value']!r} ×{p['count']}" for p in pairs[:_SAMPLES])


def _label_counts(
    frame: pd.DataFrame,
    column: str | None,
    allowed: list[Any],
    count: object,
    result: dict[str, Any],
) -> str:
    """Every unknown label with its count over the batch; GX keeps only a sample of the
    unexpected values (on 300 bad rows it reported 'eleven' ×10), so the sample is shown as
    one ("e.g. …") when the batch's own tally does not add up to GX's count."""
    if column is not None and column in frame.columns:
        unknown = frame[column][~frame[column].isin(allowed)].dropna()
        if len(unknown) == count:
            every = Counter(_hashable(v) for v in unknown.tolist())
            tally = every.most_common(_SAMPLES)
            more = len(every) - len(tally)
            shown = ", ".join(f"{value!r} ×{n}" for value, n in tally)
            return shown + (f", … {more} more" if more > 0 else "")
    return f"e.g. {_counts(result)}"


def row_count(count: object) -> str:
    """ "1 row", "3 rows" (a count that is not 1, or not known, is plural)."""
    return f"{count} row{'' if count == 1 else 's'}"


def _missing(count: object) -> str:
    """ "1 missing value (null/NaN)", "3 missing values (null/NaN)"."""
    return f"{count} missing value{'' if count == 1 else 's'} (null/NaN)"


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


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


def _non_numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    """Values of `column` that are present but are not numbers (e.g. "abc", "1,5")."""
    values = frame[column].dropna()
    return values[pd.to_numeric(values, errors="coerce").isna()]


def _type_message(
    frame: pd.DataFrame,
    column: str,
    kwargs: dict[str, Any],
    result: dict[str, Any],
    cfg: DataConfig,
) -> str:
    col = f"column {column!r}"
    if column not in cfg.features:
        observed = result.get("observed_value") or str(frame[column].dtype)
        return f"{col} must hold {kwargs.get('type_list')} values; found {observed}"
    bad = _non_numeric(frame, column)
    if bad.empty:
        return f"{col} must be numeric; its type is {frame[column].dtype}"
    samples = list(dict.fromkeys(bad.tolist()))[:_SAMPLES]
    return (
        f"{col} must be numeric but {len(bad)} values are not numbers (e.g. {samples})"
        f"{_files(frame, bad.index.tolist())} — fix the producer, or drop it from data.features"
    )


def _config_key(column: str | None, cfg: DataConfig) -> str | None:
    """The config key that names `column` (so a message can say what to change)."""
    if column is None:
        return None
    if column == cfg.label:
        return "data.label"
    if cfg.text and column == cfg.text:
        return "data.text"
    return "data.features" if column in cfg.features else None


CONTINUOUS_DISTINCT = 20  # more distinct unknown labels than this (and than classes): a measure


def _continuous_labels(frame: pd.DataFrame, column: str | None, allowed: list[Any]) -> str:
    """Why the label column looks like a regression target (numbers with many distinct
    values, or fractions, none of them a class), or "" when it looks like class labels."""
    if column is None or column not in frame.columns:
        return ""
    numbers = pd.to_numeric(frame[column], errors="coerce").dropna()
    if numbers.empty or len(numbers) < len(frame[column].dropna()):
        return ""
    unknown = numbers[~frame.loc[numbers.index, column].isin(allowed)]
    distinct = unknown.nunique()
    fractional = bool((unknown != np.round(unknown)).any())
    many = distinct > max(CONTINUOUS_DISTINCT, 2 * len(allowed))
    if len(unknown) < len(numbers) / 2 or not (many or fractional):
        return ""  # a few stray labels: the unknown-class message
    samples = ", ".join(f"{v:g}" for v in list(dict.fromkeys(unknown.tolist()))[:_SAMPLES])
    return (
        f"{distinct} distinct numeric values (e.g. {samples}), which looks like a continuous "
        "target, not class labels. evergreen trains classifiers: point data.label at a column "
        "of class labels and list them in data.classes (bin a numeric target into classes "
        "before landing it)"
    )


def _message(
    kind: str,
    column: str | None,
    kwargs: dict[str, Any],
    result: dict[str, Any],
    ctx: dict[str, Any],
) -> str:
    """The sentence for one failed expectation (`ctx`: frame, config, counts, files)."""
    frame, cfg, count, where = ctx["frame"], ctx["cfg"], ctx["count"], ctx["where"]
    col = f"column {column!r}"
    if kind in ("expect_column_to_exist", "expect_table_columns_to_match_set"):
        in_files = frame.attrs.get(COLUMNS_IN_FILES_ATTR) or frame.columns  # not only those read
        present = [str(c) for c in in_files if c != SOURCE_COLUMN]
        expected = {*cfg.features, cfg.text, cfg.label}
        unexpected = [c for c in present if c not in expected]
        close = difflib.get_close_matches(str(column), unexpected, n=1, cutoff=0.6)
        hint = f"; did the producer rename it to {close[0]!r}?" if close else ""
        key = _config_key(column, cfg)
        if key == "data.label" and not close and len(unexpected) == 1:
            close = unexpected  # the one column nothing names is most likely the labels
        if key and close:
            hint += (
                f" — if the files are right, set {key} to {close[0]!r} in the config and rerun "
                "the batch with --batch ID --force"
            )
        elif key:
            hint += (
                f" — fix the export, or {key} in the config (then rerun with --batch ID --force)"
            )
        shown = present[:12] + ([f"… {len(present)} in all"] if len(present) > 12 else [])
        return f"{col} is missing (the batch has {shown}){hint}"
    if kind == "expect_column_values_to_be_in_type_list" and column is not None:
        return _type_message(frame, column, kwargs, result, cfg)
    if kind == "expect_column_values_to_not_be_null":
        return f"{col} has {_missing(count)}{where}; expected none"
    if kind == "expect_column_values_to_be_between":
        low, high = kwargs.get("min_value"), kwargs.get("max_value")
        if low == -_FINITE_MAX and high == _FINITE_MAX:
            return f"{col} has {count} non-finite values (±inf){where}; expected finite numbers"
        values = pd.to_numeric(frame[column], errors="coerce")
        infinite = int(np.isinf(values.to_numpy(dtype=float, na_value=np.nan)).sum())
        inf_note = f", {infinite} of them ±inf" if infinite else ""
        source = (ctx.get("meta") or {}).get("bounds_from", "the suite file")
        if source.startswith("accepted data"):
            share = f" ({count / max(len(frame), 1):.1%})" if count is not None else ""
            return (
                f"{col} has {count} values{share} {RANGE_CHANGE} "
                f"[{low:.6g}, {high:.6g}] (e.g. {_counts(result)}){where} — change, learned from "
                "unless data.change.block lists 'range'"
            )
        fix = (
            "fix the data, or widen data.feature_bounds if the shift is real"
            if source == "data.feature_bounds"
            else "if the shift is real, widen the bounds in the suite file"
        )
        return (
            f"{col} has {count} values outside [{low:.6g}, {high:.6g}] ({source}){inf_note} "
            f"(e.g. {_counts(result)}){where} — {fix}"
        )
    if kind == "expect_column_values_to_be_in_set":
        classes = list(kwargs.get("value_set") or cfg.classes)
        continuous = _continuous_labels(frame, column, classes)
        if continuous:
            return f"{col} has {row_count(count)} with labels not in data.classes {classes}: {continuous}"
        source = "data.classes" if classes == list(cfg.classes) else "the suite's value_set"
        return (
            f"{col} has {row_count(count)} with labels not in {source} {classes}: "
            f"{_label_counts(frame, column, classes, count, result)}{where} — new_class_policy={cfg.new_class_policy}: the batch is "
            "held back; if the class is real, add it to data.classes (a champion's classes are fixed "
            "when it is first trained: after bootstrap, a new class needs a new model)"
        )
    if kind == "expect_table_row_count_to_be_between":
        return (
            f"the batch has {row_count(result.get('observed_value'))}; expected between "
            f"{kwargs.get('min_value')} and {kwargs.get('max_value')} (data.min_rows/max_rows)"
        )
    if kind == "expect_compound_columns_to_be_unique":
        fraction = count / max(len(frame), 1) if count is not None else float("nan")
        allowed = 1.0 - float(kwargs.get("mostly", 1.0))
        return (
            f"{count} rows ({fraction:.1%}) are exact duplicates over the feature and label "
            f"columns (every copy counted; {_repeats(frame, kwargs.get('column_list', []))} "
            f"repeat an earlier row){where}; "
            f"tolerated: at most {allowed:.1%} (data.max_duplicate_fraction)"
        )
    return f"{kind} failed on {column or 'the table'} ({kwargs}): observed {result}"


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
        samples = list(res.get("partial_unexpected_list") or [])[:_SAMPLES]
        if error:
            target = column or sorted(involved) or "the table"
            message = f"{kind} on {target} could not run: {error}"
        else:
            ctx = {
                "frame": frame,
                "cfg": data_cfg,
                "count": count,
                "where": _files(frame, _failed_rows(kind, kwargs, res, frame)),
                "meta": config.get("meta"),
            }
            message = _message(kind, column, kwargs, res, ctx)
        if kind == "expect_column_values_to_be_in_type_list" and column in data_cfg.features:
            bad = _non_numeric(frame, column) if column in frame.columns else None
            if bad is not None:
                samples, count = list(dict.fromkeys(bad.tolist()))[:_SAMPLES], len(bad)
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
            where = _files(frame, nulls.index.tolist()[:10])
            message = f"column {column!r} has {_missing(len(nulls))}{where}; expected none"
            found.append(
                Failure(KIND_NULL, column, len(nulls), nulls.tolist()[:_SAMPLES], message, severity)
            )
        odd = _not_numbers(values)
        if len(odd):
            message = _type_message(frame, column, {"type_list": "numbers"}, {}, cfg)
            bad = _non_numeric(frame, column)
            shown = bad if len(bad) else odd
            samples = list(dict.fromkeys(shown.tolist()))[:_SAMPLES]
            found.append(Failure(KIND_TYPE, column, len(shown), samples, message, severity))
            continue  # ±inf of a text column is not asked
        if column in cfg.feature_bounds:
            continue
        numbers = values.to_numpy(dtype=float, na_value=np.nan)
        infinite = values[np.isinf(numbers)]
        if len(infinite):
            where = _files(frame, infinite.index.tolist()[:10])
            message = (
                f"column {column!r} has {len(infinite)} non-finite values (±inf){where}; "
                "expected finite numbers"
            )
            samples = infinite.tolist()[:_SAMPLES]
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
        Failure(kind, column, None, [], _message(kind, column, kwargs, {}, ctx), severity)
        for column in columns
    ]


def _repeats(frame: pd.DataFrame, columns: list[str]) -> int:
    present = [c for c in columns if c in frame.columns]
    return int(frame.duplicated(subset=present).sum()) if present else 0


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
    repeats = _repeats(frame, present)
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
