"""The sentence for one failed Great Expectations check (`failure_message`): what is wrong, in
which column and files, how many rows, sample values, and what to change — the config key
(`data.features`, `data.classes`, ...), the suite file, or the producer.

`data_plane.messages` decides which failed checks to report and calls these.
"""

from __future__ import annotations

import difflib
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from data_plane.landing import COLUMNS_IN_FILES_ATTR
from data_plane.readers import SOURCE_COLUMN
from data_plane.validation_report import RANGE_CHANGE

if TYPE_CHECKING:
    from evergreen.config import DataConfig


_FINITE_MAX = sys.float_info.max
SAMPLES = 5


def files_of(frame: pd.DataFrame, rows: list[Any]) -> str:
    """The files the rows at positions `rows` came from, as " in a.csv, b.csv" ("" if unknown)."""
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
    return ", ".join(f"{p['value']!r} ×{p['count']}" for p in pairs[:SAMPLES])


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
            tally = every.most_common(SAMPLES)
            more = len(every) - len(tally)
            shown = ", ".join(f"{value!r} ×{n}" for value, n in tally)
            return shown + (f", … {more} more" if more > 0 else "")
    return f"e.g. {_counts(result)}"


def row_count(count: object) -> str:
    """ "1 row", "3 rows" (a count that is not 1, or not known, is plural)."""
    return f"{count} row{'' if count == 1 else 's'}"


def missing_values(count: object) -> str:
    """ "1 missing value (null/NaN)", "3 missing values (null/NaN)"."""
    return f"{count} missing value{'' if count == 1 else 's'} (null/NaN)"


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def non_numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    """Values of `column` that are present but are not numbers (e.g. "abc", "1,5")."""
    values = frame[column].dropna()
    return values[pd.to_numeric(values, errors="coerce").isna()]


def type_message(
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
    bad = non_numeric(frame, column)
    if bad.empty:
        return f"{col} must be numeric; its type is {frame[column].dtype}"
    samples = list(dict.fromkeys(bad.tolist()))[:SAMPLES]
    return (
        f"{col} must be numeric but {len(bad)} values are not numbers (e.g. {samples})"
        f"{files_of(frame, bad.index.tolist())} — fix the producer, or drop it from data.features"
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
    samples = ", ".join(f"{v:g}" for v in list(dict.fromkeys(unknown.tolist()))[:SAMPLES])
    return (
        f"{distinct} distinct numeric values (e.g. {samples}), which looks like a continuous "
        "target, not class labels. evergreen trains classifiers: point data.label at a column "
        "of class labels and list them in data.classes (bin a numeric target into classes "
        "before landing it)"
    )


def failure_message(
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
        return type_message(frame, column, kwargs, result, cfg)
    if kind == "expect_column_values_to_not_be_null":
        return f"{col} has {missing_values(count)}{where}; expected none"
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
            f"columns (every copy counted; {repeated_rows(frame, kwargs.get('column_list', []))} "
            f"repeat an earlier row){where}; "
            f"tolerated: at most {allowed:.1%} (data.max_duplicate_fraction)"
        )
    return f"{kind} failed on {column or 'the table'} ({kwargs}): observed {result}"


def repeated_rows(frame: pd.DataFrame, columns: list[str]) -> int:
    """Rows that repeat an earlier row over those of `columns` the batch has (0 if none)."""
    present = [c for c in columns if c in frame.columns]
    return int(frame.duplicated(subset=present).sum()) if present else 0
