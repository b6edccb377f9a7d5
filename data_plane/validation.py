"""Batch validation with Great Expectations: a reviewable suite file and actionable reports.

The suite lives in `<home>/expectations/<name>.json` (GX's own JSON format): it is written once
from the config (`ensure_suite`) and is the user's to edit afterwards. Every batch is validated
against that file in an ephemeral GX context (one per process: GX is slow to start) and the
result is turned into a `ValidationReport` whose failures each name the expectation, column,
row count, sample values and what was expected.

Checks: columns exist; features numeric (text: strings); no nulls in features/label; features
within bounds (from `data.feature_bounds`, bootstrap-inferred bounds, or at least the finite
float range, so ±inf always fails — GX's between treats inf as an ordinary large number);
labels in `data.classes`; row count in [min_rows, max_rows]; duplicates via GX's
compound-columns-unique with `mostly = 1 - max_duplicate_fraction`, so "duplicate rows" means
rows that have an identical copy over the feature+label columns, every copy counted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from data_plane import messages
from data_plane.landing import LandingZone, data_columns, read_batch
from data_plane.readers import BatchReadError

if TYPE_CHECKING:
    import great_expectations as gx

    from evergreen.config import DataConfig

log = logging.getLogger(__name__)

FINITE_MAX = sys.float_info.max
NUMERIC_TYPES = ["int", "float"] + [f"int{b}" for b in (8, 16, 32, 64)]
NUMERIC_TYPES += [f"uint{b}" for b in (8, 16, 32, 64)] + ["float16", "float32", "float64"]
TEXT_TYPES = ["str"]
RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": 10}
_GX_LOCK = threading.Lock()


@dataclass
class Failure:
    """One failed check, phrased for the person who has to fix the data."""

    expectation: str
    column: str | None
    unexpected_count: int | None
    sample_values: list = field(default_factory=list)
    message: str = ""


@dataclass
class ValidationReport:
    """The outcome of validating one batch (or of failing to read it)."""

    batch_id: str
    success: bool
    n_rows: int
    failures: list[Failure]
    statistics: dict
    gx_result: dict | None = None

    def to_json(self) -> str:
        """Strict JSON (non-finite floats become strings such as "inf")."""
        return json.dumps(_json_safe(asdict(self)), indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> ValidationReport:
        data = json.loads(text)
        data["failures"] = [Failure(**f) for f in data.get("failures", [])]
        return cls(**data)

    @classmethod
    def from_read_error(cls, batch_id: str, error: BatchReadError) -> ValidationReport:
        """A failed report for a batch that could not even be read."""
        failure = Failure("read_batch", None, None, [], str(error))
        stats = {"read_error": {"file": error.file, "reason": error.reason}}
        return cls(batch_id, False, 0, [failure], stats, None)

    def headline(self) -> str:
        """One line for logs and flow failure messages."""
        if self.success:
            checks = self.statistics.get("gx", {}).get("evaluated_expectations", "all")
            return f"batch {self.batch_id}: valid ({self.n_rows} rows, {checks} checks passed)"
        first = self.failures[0].message if self.failures else "failed"
        more = f" (+{len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
        return f"batch {self.batch_id}: INVALID — {first}{more}"

    def summary(self) -> str:
        """A Markdown report: what failed, where, how many rows, samples, what was expected."""
        return messages.render_summary(self)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def infer_feature_bounds(
    df: pd.DataFrame, features: list[str], *, margin: float = 0.5
) -> dict[str, tuple[float, float]]:
    """Observed [min, max] per feature widened by `margin` × range (bootstrap-time bounds).

    A constant column is widened by max(1, |value|) so the next batch is not rejected for
    varying a little.

    Raises:
        ValueError: a feature is missing or has no finite value.
    """
    bounds: dict[str, tuple[float, float]] = {}
    for name in features:
        if name not in df.columns:
            raise ValueError(f"cannot infer bounds: feature column {name!r} is missing")
        values = pd.to_numeric(df[name], errors="coerce").to_numpy(dtype=float)
        values = values[np.isfinite(values)]
        if values.size == 0:
            raise ValueError(f"cannot infer bounds: feature {name!r} has no finite value")
        low, high = float(values.min()), float(values.max())
        width = margin * (high - low) if high > low else max(1.0, abs(low))
        bounds[name] = (low - width, high + width)
    return bounds


def build_suite(
    data_cfg: DataConfig,
    *,
    feature_bounds: dict[str, tuple[float, float]] | None = None,
    name: str = "evergreen-batch",
) -> gx.ExpectationSuite:
    """The expectation suite for `data_cfg` (see the module docstring for the checks).

    Args:
        data_cfg: columns, classes, row-count and duplicate limits, optional bounds.
        feature_bounds: bounds for features that `data_cfg.feature_bounds` does not fix.
        name: suite name (and file stem).
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe

    label = data_cfg.label
    columns = data_columns(data_cfg)
    expectations: list[gxe.Expectation] = []  # no context needed (suite.add_expectation needs one)
    add = expectations.append
    for column in columns:
        add(gxe.ExpectColumnToExist(column=column))
    for feature in data_cfg.features:
        low, high, source = _bounds_for(feature, data_cfg, feature_bounds)
        add(gxe.ExpectColumnValuesToBeInTypeList(column=feature, type_list=NUMERIC_TYPES))
        add(gxe.ExpectColumnValuesToNotBeNull(column=feature))
        add(
            gxe.ExpectColumnValuesToBeBetween(
                column=feature, min_value=low, max_value=high, meta={"bounds_from": source}
            )
        )
    if data_cfg.text:
        add(gxe.ExpectColumnValuesToBeInTypeList(column=data_cfg.text, type_list=TEXT_TYPES))
        add(gxe.ExpectColumnValuesToNotBeNull(column=data_cfg.text))
    add(gxe.ExpectColumnValuesToNotBeNull(column=label))
    add(gxe.ExpectColumnValuesToBeInSet(column=label, value_set=list(data_cfg.classes)))
    add(
        gxe.ExpectTableRowCountToBeBetween(min_value=data_cfg.min_rows, max_value=data_cfg.max_rows)
    )
    add(
        gxe.ExpectCompoundColumnsToBeUnique(
            column_list=columns,
            mostly=round(1.0 - data_cfg.max_duplicate_fraction, 12),
            meta={"tolerated_duplicate_fraction": data_cfg.max_duplicate_fraction},
        )
    )
    return gx.ExpectationSuite(name=name, expectations=expectations)


def _bounds_for(
    feature: str, data_cfg: DataConfig, inferred: dict[str, tuple[float, float]] | None
) -> tuple[float, float, str]:
    if feature in data_cfg.feature_bounds:
        low, high = data_cfg.feature_bounds[feature]
        return float(low), float(high), "data.feature_bounds"
    if inferred and feature in inferred:
        low, high = inferred[feature]
        return float(low), float(high), "inferred at bootstrap"
    return -FINITE_MAX, FINITE_MAX, "finite values only"


def suite_path(home: Path, name: str = "evergreen-batch") -> Path:
    """Where the suite file lives: `<home>/expectations/<name>.json`."""
    return Path(home) / "expectations" / f"{name}.json"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_suite(suite: gx.ExpectationSuite, path: Path) -> Path:
    """Write `suite` as indented GX JSON (atomic); returns `path`."""
    data = suite.to_json_dict()
    data.pop("id", None)
    _atomic_write(Path(path), json.dumps(data, indent=2) + "\n")
    return Path(path)


def load_suite(path: Path) -> gx.ExpectationSuite:
    """Read a (possibly hand-edited) suite file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not valid JSON or an expectation in it is invalid (names which).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"expectation suite {path} not found: run the bootstrap flow to create it"
        )
    return _parse_suite(path.read_text(encoding="utf-8"), path)


def _parse_suite(text: str, path: Path) -> gx.ExpectationSuite:
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "fix it, or delete it to have it regenerated from the config"
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("expectations"), list):
        raise ValueError(f"{path}: expected an object with an `expectations` list")
    expectations = []
    for index, item in enumerate(data["expectations"]):
        kind = item.get("type") if isinstance(item, dict) else None
        try:
            config = ExpectationConfiguration(
                type=str(kind), kwargs=dict(item.get("kwargs") or {}), meta=item.get("meta")
            )
            expectations.append(config.to_domain_obj())
        except Exception as exc:
            raise ValueError(
                f"{path}: expectation #{index} ({kind!r}) is invalid: {exc}".replace("\n", " ")
            ) from exc
    return gx.ExpectationSuite(
        name=str(data.get("name") or path.stem),
        expectations=expectations,
        meta=data.get("meta") or None,
        notes=data.get("notes"),
    )


def ensure_suite(
    home: Path,
    data_cfg: DataConfig,
    *,
    feature_bounds: dict[str, tuple[float, float]] | None = None,
) -> Path:
    """Write the suite from the config if missing; otherwise keep (and check) the user's file."""
    path = suite_path(home)
    if not path.exists():
        return write_suite(build_suite(data_cfg, feature_bounds=feature_bounds), path)
    suite = load_suite(path)
    covered = {getattr(e, "column", None) for e in suite.expectations}
    expected = data_columns(data_cfg)
    stale = [c for c in expected if c not in covered]
    if stale:
        log.warning("%s has no expectation on configured columns %s: edit/delete it", path, stale)
    return path


@functools.cache
def _gx_runtime() -> tuple[Any, Any]:
    """One ephemeral GX context + pandas batch definition per process (GX starts slowly)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas("evergreen").add_dataframe_asset("batch")
    return context, asset.add_batch_definition_whole_dataframe("whole")


def _gx_frame(df: pd.DataFrame) -> pd.DataFrame:
    """GX 1.24 does not know pandas' `str` dtype: hand it object columns (values unchanged)."""
    frame = df.reset_index(drop=True)
    strings = [c for c in frame.columns if pd.api.types.is_string_dtype(frame[c].dtype)]
    return frame.astype(dict.fromkeys(strings, object)) if strings else frame


_DEFINITIONS: dict[str, Any] = {}  # sha256 of a suite file → its registered definition


def _definition_for(suite_file: Path) -> Any:
    """The validation definition for this suite file's content, registered once per process.

    Registering a suite costs ~0.1 s, updating one in place several seconds (GX saves each
    expectation), so an edited file is registered anew under a content-derived name.
    """
    import great_expectations as gx

    text = Path(suite_file).read_text(encoding="utf-8")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest not in _DEFINITIONS:
        suite = _parse_suite(text, Path(suite_file))
        suite.name = f"{suite.name}-{digest[:12]}"
        context, batch_definition = _gx_runtime()
        suite = context.suites.add(suite)
        definition = gx.ValidationDefinition(name=suite.name, data=batch_definition, suite=suite)
        _DEFINITIONS[digest] = context.validation_definitions.add(definition)
    return _DEFINITIONS[digest]


def run_suite(frame: pd.DataFrame, suite_file: Path) -> dict:
    """Run the suite in `suite_file` on `frame` (process-wide context); GX's result as a dict.

    Raises:
        FileNotFoundError, ValueError: see `load_suite`.
    """
    if not Path(suite_file).exists():
        load_suite(suite_file)  # raises the actionable FileNotFoundError
    with _GX_LOCK:
        definition = _definition_for(suite_file)
        result = definition.run(batch_parameters={"dataframe": frame}, result_format=RESULT_FORMAT)
    return result.to_json_dict()


def validate_batch(
    df: pd.DataFrame, batch_id: str, data_cfg: DataConfig, suite_file: Path
) -> ValidationReport:
    """Validate one batch against the suite file.

    Args:
        df: the batch as returned by `read_batch` (`_source_file` is used to name files).
        batch_id: for the report.
        data_cfg: for messages and statistics (the checks come from `suite_file`).
        suite_file: the GX suite JSON (see `ensure_suite`).

    Returns:
        The report; `success` is False if any expectation failed.
    """
    frame = _gx_frame(df)
    started = time.perf_counter()
    result = run_suite(frame, suite_file)
    elapsed = time.perf_counter() - started
    failures = messages.failures_from_result(result, frame, data_cfg)
    stats = messages.batch_statistics(frame, data_cfg)
    stats.update(gx=result.get("statistics", {}), seconds=round(elapsed, 3), suite=str(suite_file))
    report = ValidationReport(
        batch_id, bool(result.get("success")) and not failures, len(frame), failures, stats
    )
    report.gx_result = messages.compact_result(result)
    log.info("%s (GX %.2fs)", report.headline(), elapsed)
    return report


def read_and_validate(
    zone: LandingZone, batch_id: str, data_cfg: DataConfig, suite_file: Path
) -> tuple[pd.DataFrame | None, ValidationReport]:
    """Read a batch and validate it; a read error becomes a failed report (frame None).

    This is the ingest+validate step of every flow: invalid batches get a report, never an
    exception, so the caller can quarantine them.
    """
    try:
        frame = read_batch(zone, batch_id, data_cfg)
    except BatchReadError as error:
        report = ValidationReport.from_read_error(batch_id, error)
        log.warning(report.headline())
        return None, report
    return frame, validate_batch(frame, batch_id, data_cfg, suite_file)


def save_report(report: ValidationReport, directory: Path) -> tuple[Path, Path]:
    """Write `<directory>/<batch_id>.json` and `.md` atomically; returns both paths."""
    stem = report.batch_id.replace("/", "_").replace(os.sep, "_")
    json_path, md_path = Path(directory) / f"{stem}.json", Path(directory) / f"{stem}.md"
    _atomic_write(json_path, report.to_json() + "\n")
    _atomic_write(md_path, report.summary())
    return json_path, md_path
