"""Batch validation with Great Expectations: integrity blocks, change informs.

Two kinds of checks, kept apart because they call for opposite reactions:

- **Integrity** (GX severity `critical`, blocking: the batch is quarantined, its files untouched):
  unreadable files, missing or extra columns, wrong types (text in a numeric column), nulls and
  ±inf, labels outside `data.classes`, too few/many rows, duplicates beyond
  `data.max_duplicate_fraction`, and bounds the user *declared* in `data.feature_bounds`. These
  live in the suite `<home>/gx/expectations/<name>.json`, in the suite store of the file-backed
  GX Data Context `<home>/gx/`, written once from the config and the user's to edit afterwards. One more blocking check has no GX
  expectation: gross, batch-wide breakage (most features far outside everything accepted so
  far — a unit switch), decided by `data_plane.profile.gross_change`.
- **Change** (GX severity `warning`, informing): values beyond the range accepted so far
  (`expect_column_values_to_be_between` with `mostly`, generated at each run from the
  `DataProfile` of all accepted data, so it widens as data is accepted and one extreme value
  never decides anything), KS/PSI drift against the accepted data, a class mix never seen
  before. They go to the report, the drift report and the run; `data.change.block` makes chosen
  ones blocking.

Every batch is validated by a GX Checkpoint (one per suite content: the user's suite plus the
change checks of the run) in the file-backed context `<home>/gx/` when the flows call it, whose
UpdateDataDocsAction adds the batch's page to the Data Docs site
(`<home>/gx/uncommitted/data_docs/local_site/index.html`; validation results are stored beside
it); library callers that pass no project get an ephemeral context (nothing written). With
`data.gx_store: s3://bucket/prefix` (several workers) the context's stores are shared in S3:
`<home>/gx/` is synced with it around each validation and the Data Docs URL is the page's in
the bucket (`data_plane.gx_store` says why a sync and not a GX store backend). The
context is opened once per process (GX is slow to start). The result is turned into a
`ValidationReport` whose failures and warnings each name the expectation, column, row count,
sample values and what was expected.

This module is the entry point (`validate_batch`, `read_and_validate`, `save_report`) and holds
the change checks; the integrity suite file is `data_plane.gx_suite`'s (`ensure_suite`), running
it through a Checkpoint and Data Docs `data_plane.gx_run`'s.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from continual.files import atomic_write_text
from data_plane import messages, text_validation
from data_plane.drift import drift_report
from data_plane.gx_run import run_suite
from data_plane.gx_store import shared_store
from data_plane.landing import COLUMNS_IN_FILES_ATTR, LandingZone, data_columns, read_batch
from data_plane.messages import Failure, ValidationReport
from data_plane.profile import DataProfile, GrossChangeRule, class_mix_change, gross_change
from data_plane.readers import SOURCE_COLUMN, BatchReadError

if TYPE_CHECKING:
    from evergreen.config import DataConfig

log = logging.getLogger(__name__)


def change_expectations(data_cfg: DataConfig, profile: DataProfile | None) -> list[Any]:
    """Range checks against the data accepted so far: severity `warning` unless the user put
    "range" in `data.change.block`. `mostly` lets a few extreme values through.

    The bounds are GX expectation parameters (`{"$PARAMETER": ...}`), filled in at run time by
    `change_parameters`: the ranges widen with every accepted batch, and baking them into the
    suite made every run register a new suite, validation definition and checkpoint (a
    second each, a suite file and a suite page per run, and one more cached checkpoint in the
    process). With parameters the suite depends only on the features and the policy.
    """
    import great_expectations.expectations as gxe
    from great_expectations.expectations.metadata_types import FailureSeverity

    blocking = "range" in data_cfg.change.block
    severity = FailureSeverity.CRITICAL if blocking else FailureSeverity.WARNING
    expectations = []
    for index, feature in _ranged_features(data_cfg, profile):
        expectations.append(
            gxe.ExpectColumnValuesToBeBetween(
                column=feature,
                min_value={"$PARAMETER": f"range_low_{index}"},
                max_value={"$PARAMETER": f"range_high_{index}"},
                mostly=data_cfg.change.range_mostly,
                severity=severity,
                meta={"bounds_from": "accepted data"},
            )
        )
    return expectations


def change_parameters(data_cfg: DataConfig, profile: DataProfile | None) -> dict[str, float]:
    """The values of the parameters `change_expectations` refers to: the accepted ranges."""
    values: dict[str, float] = {}
    if profile is None:
        return values
    for index, feature in _ranged_features(data_cfg, profile):
        known = profile.ranges[feature]
        values[f"range_low_{index}"] = float(known.low)
        values[f"range_high_{index}"] = float(known.high)
    return values


def _ranged_features(data_cfg: DataConfig, profile: DataProfile | None) -> list[tuple[int, str]]:
    """(position, feature) of the features with an accepted range and no declared bounds; the
    position names the parameters (GX parameter names cannot hold arbitrary column names)."""
    if profile is None or profile.empty:
        return []
    return [
        (index, feature)
        for index, feature in enumerate(data_cfg.features)
        if profile.ranges.get(feature) is not None and feature not in data_cfg.feature_bounds
    ]


def _gx_frame(df: pd.DataFrame) -> pd.DataFrame:
    """GX 1.24 does not know pandas' `str` dtype: hand it object columns (values unchanged)."""
    frame = df.reset_index(drop=True)
    strings = [c for c in frame.columns if pd.api.types.is_string_dtype(frame[c].dtype)]
    return frame.astype(dict.fromkeys(strings, object)) if strings else frame


def validate_batch(
    df: pd.DataFrame,
    batch_id: str,
    data_cfg: DataConfig,
    suite_file: Path,
    *,
    profile: DataProfile | None = None,
    reference: pd.DataFrame | None = None,
    gx_project: Path | None = None,
) -> ValidationReport:
    """Validate one batch: integrity checks block, change checks inform (module docstring).

    Args:
        df: the batch as returned by `read_batch` (`_source_file` is used to name files).
        batch_id: for the report.
        data_cfg: columns, classes and the change policy (`data.change`).
        suite_file: the integrity suite JSON (see `gx_suite.ensure_suite`).
        profile: what the data accepted so far looked like (None or empty for the first batch).
        reference: a sample of the accepted data for KS/PSI drift (None: no drift check).
        gx_project: the folder holding the file-backed GX project (`<home>`, so `<home>/gx/`):
            the validation result is stored and Data Docs updated there; None: in memory.

    Returns:
        The report; `success` is False if any blocking check failed. With `gx_project`,
        `statistics["data_docs"]` is the URL of this batch's Data Docs page.
    """
    frame = _gx_frame(text_validation.gx_safe(df, data_cfg))
    started = time.perf_counter()
    extra = change_expectations(data_cfg, profile)
    result = run_suite(
        frame,
        suite_file,
        extra,
        project=gx_project,
        run_name=batch_id,
        parameters=change_parameters(data_cfg, profile),
        keep_results=data_cfg.data_docs_keep,
        store=shared_store(data_cfg.gx_store) if gx_project is not None else None,
    )
    elapsed = time.perf_counter() - started
    found = messages.failures_from_result(result, frame, data_cfg)
    found += _extra_columns(df, data_cfg)
    found += text_validation.text_failures(df, data_cfg)
    failures = [f for f in found if f.severity == "critical"]
    warnings = [f for f in found if f.severity != "critical"]
    stats = messages.batch_statistics(frame, data_cfg)
    stats.update(gx=result.get("statistics", {}), seconds=round(elapsed, 3), suite=str(suite_file))
    if result.get("data_docs_url"):
        stats["data_docs"] = result["data_docs_url"]
    if not failures:  # change checks need clean numbers to mean anything
        failures += _repeated_batch(frame, batch_id, data_cfg, profile)
        _change_checks(frame, data_cfg, profile, reference, failures, warnings, stats)
    report = ValidationReport(batch_id, not failures, len(frame), failures, stats, None, warnings)
    report.gx_result = messages.compact_result(result)
    log.info("%s (GX %.2fs)", report.headline(), elapsed)
    return report


def _extra_columns(df: pd.DataFrame, data_cfg: DataConfig) -> list[Failure]:
    """Columns in the files that the config does not know: a renamed or added column."""
    in_files = set(df.attrs.get(COLUMNS_IN_FILES_ATTR, ()))
    extra = sorted(in_files - set(data_columns(data_cfg)) - {SOURCE_COLUMN})
    if not extra or data_cfg.extra_columns == "ignore":
        return []
    where = (  # a text config refuses features: it reads one text column
        f"fix the export (a text model reads data.text {data_cfg.text!r}"
        f"{'' if data_cfg.text_only else ' and data.label ' + repr(data_cfg.label)})"
        if data_cfg.text
        else "add them to data.features, fix the export"
    )
    message = (
        f"the files hold columns the config does not list: {extra[:10]} — {where}, or set "
        "data.extra_columns: ignore"
    )
    return [Failure("expect_table_columns_to_match_set", None, len(extra), extra[:5], message)]


def _repeated_batch(
    frame: pd.DataFrame, batch_id: str, data_cfg: DataConfig, profile: DataProfile | None
) -> list[Failure]:
    """A batch whose rows are exactly those of a batch already accepted under another id: a
    re-export or a copy landed twice. It holds nothing new and would train its rows twice."""
    first = profile.repeated_batch(frame, batch_id, data_columns(data_cfg)) if profile else None
    if first is None:
        return []
    message = (
        f"the batch holds the same rows as batch {first!r}, already accepted (in any order): a "
        "batch landed twice adds nothing and would weigh its rows twice — remove the copy, or "
        "land the rows that are really new"
    )
    return [Failure("repeated_batch", None, len(frame), [], message)]


def _change_checks(
    frame: pd.DataFrame,
    data_cfg: DataConfig,
    profile: DataProfile | None,
    reference: pd.DataFrame | None,
    failures: list[Failure],
    warnings: list[Failure],
    stats: dict[str, Any],
) -> None:
    """Gross breakage (blocks by default), class mix and KS/PSI drift (inform by default)."""
    change = data_cfg.change
    if profile is not None and not profile.empty and data_cfg.features:
        rule = GrossChangeRule(
            change.gross_range_factor, change.gross_value_share, change.gross_displaced_share
        )
        verdict = gross_change(frame, profile, data_cfg.features, rule)
        stats["gross_change"] = {"displaced": verdict.displaced, "n_features": verdict.n_features}
        if verdict.broken and change.gross_change:
            failures.append(
                Failure("gross_change", None, len(verdict.displaced), [], verdict.message())
            )
        mix = class_mix_change(frame, profile, data_cfg.label)
        stats["class_mix"] = mix
        if mix["new_classes"] or mix["total_variation"] >= change.class_mix_threshold:
            message = (
                f"class mix changed: total variation {mix['total_variation']:.2f} from the "
                f"accepted data; classes never accepted before: {mix['new_classes'] or 'none'}"
            )
            target = failures if "class_mix" in change.block else warnings
            severity = "critical" if target is failures else "warning"
            target.append(Failure("class_mix", data_cfg.label, None, [], message, severity))
    if reference is not None and len(reference) and data_cfg.text in reference.columns:
        stats["text_change"] = text_validation.text_change(frame, reference, str(data_cfg.text))
        for finding in text_validation.text_change_failures(stats["text_change"], data_cfg):
            (failures if finding.severity == "critical" else warnings).append(finding)
    if reference is not None and len(reference) and data_cfg.features:
        drift = drift_report(
            reference, frame, list(data_cfg.features), psi_threshold=change.drift_psi
        )
        stats["drift"] = {
            "n_drifted": drift.n_drifted,
            "n_features": len(drift.features),
            "max_psi": drift.max_psi,
            "drifted": [f.feature for f in drift.features if f.drifted][:20],
        }
        if drift.n_drifted:
            message = (
                f"{drift.n_drifted} of {len(drift.features)} features drifted from the accepted "
                f"data (KS + PSI ≥ {change.drift_psi:g}; max PSI {drift.max_psi:.2f})"
            )
            target = failures if "drift" in change.block else warnings
            severity = "critical" if target is failures else "warning"
            target.append(Failure("drift", None, drift.n_drifted, [], message, severity))


def read_and_validate(
    zone: LandingZone,
    batch_id: str,
    data_cfg: DataConfig,
    suite_file: Path,
    *,
    profile: DataProfile | None = None,
    reference: pd.DataFrame | None = None,
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
    report = validate_batch(
        frame, batch_id, data_cfg, suite_file, profile=profile, reference=reference
    )
    return frame, report


def save_report(report: ValidationReport, directory: Path) -> tuple[Path, Path]:
    """Write `<directory>/<batch_id>.json` and `.md` atomically; returns both paths."""
    stem = report.batch_id.replace("/", "_").replace(os.sep, "_")
    json_path, md_path = Path(directory) / f"{stem}.json", Path(directory) / f"{stem}.md"
    atomic_write_text(json_path, report.to_json() + "\n")
    atomic_write_text(md_path, report.summary())
    return json_path, md_path
