"""Validate: Great Expectations on every batch; failures are quarantined, the rest split."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from data_plane.drift import drift_report
from data_plane.landing import data_columns
from data_plane.splits import content_hash, split_holdout
from data_plane.validation import (
    ValidationReport,
    ensure_suite,
    infer_feature_bounds,
    save_report,
    validate_batch,
)
from evergreen.config import EvergreenConfig
from model_registry.ledger import Ledger
from tasks.common import current_flow_run_id
from tasks.events import emit
from tasks.ingest import RawBatch


@dataclass
class PreparedData:
    """The valid part of a flow's input: train/holdout rows and what they came from."""

    batch_ids: list[str]
    train: pd.DataFrame
    holdout: pd.DataFrame
    data_hash: str
    reports: dict[str, Path] = field(default_factory=dict)
    quarantined: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.batch_ids


def suite_for(cfg: EvergreenConfig, first_frame: pd.DataFrame | None) -> Path:
    """The expectation suite file; on first use its feature bounds come from the first batch."""
    bounds = None
    if first_frame is not None and cfg.data.features and not cfg.data.feature_bounds:
        present = [c for c in cfg.data.features if c in first_frame.columns]
        numeric = first_frame[present].select_dtypes("number").columns.tolist()
        if len(numeric) == len(cfg.data.features):
            bounds = infer_feature_bounds(first_frame, numeric)
    return ensure_suite(cfg.home_path, cfg.data, feature_bounds=bounds)


def quarantine(
    cfg: EvergreenConfig, cadence: str, report: ValidationReport, files: tuple[Path, Path]
):
    """Record a failed batch: ledger entry, event, artifact. Its files stay where they are."""
    Ledger.from_config(cfg).record(
        cadence,
        report.batch_id,
        "quarantined",
        details={"reason": report.headline()[:500], "report": str(files[0])},
    )
    emit(
        "evergreen.batch.quarantined",
        cfg,
        {"batch_id": report.batch_id, "cadence": cadence, "reason": report.headline()},
    )
    create_markdown_artifact(
        key=f"quarantine-{cadence}",
        markdown=report.summary(),
        description=f"Batch {report.batch_id} quarantined",
    )
    get_run_logger().error("batch %s quarantined: %s", report.batch_id, report.headline())


@task(cache_policy=NO_CACHE, timeout_seconds=900)
def validate_batches(cfg: EvergreenConfig, cadence: str, raw: list[RawBatch]) -> PreparedData:
    """Validate each batch against the suite; quarantine failures; split the valid ones."""
    first = next((b.frame for b in raw if b.frame is not None), None)
    suite_file = suite_for(cfg, first)
    report_dir = cfg.home_path / "reports" / "validation" / cadence
    columns = data_columns(cfg.data)
    good: list[tuple[str, pd.DataFrame]] = []
    prepared = PreparedData([], pd.DataFrame(), pd.DataFrame(), "")
    for batch in raw:
        if batch.frame is None:
            report = ValidationReport.from_read_error(batch.batch_id, batch.read_error)
        else:
            report = validate_batch(batch.frame, batch.batch_id, cfg.data, suite_file)
        files = save_report(report, report_dir)
        prepared.reports[f"validation/{batch.batch_id}.json"] = files[0]
        prepared.reports[f"validation/{batch.batch_id}.md"] = files[1]
        create_markdown_artifact(
            key=f"validation-{cadence}",
            markdown=report.summary(),
            description=f"Great Expectations: batch {batch.batch_id}",
        )
        if not report.success:
            quarantine(cfg, cadence, report, files)
            prepared.quarantined.append(batch.batch_id)
            continue
        frame = batch.frame[columns].copy()
        frame["batch_id"] = batch.batch_id
        good.append((batch.batch_id, frame))
    if not good:
        return prepared
    return _split(cfg, good, prepared)


def _split(cfg: EvergreenConfig, good: list[tuple[str, pd.DataFrame]], prepared: PreparedData):
    columns = data_columns(cfg.data)
    trains, holdouts = [], []
    for batch_id, frame in good:
        train, holdout = split_holdout(frame, columns, cfg.data.holdout_fraction, salt=batch_id)
        trains.append(train)
        holdouts.append(holdout)
    prepared.batch_ids = [b for b, _ in good]
    prepared.train = pd.concat(trains, ignore_index=True)
    prepared.holdout = pd.concat(holdouts, ignore_index=True)
    prepared.data_hash = content_hash(pd.concat([f for _, f in good]), columns)[:16]
    get_run_logger().info(
        "validated %s: %d train / %d holdout rows (flow run %s)",
        prepared.batch_ids,
        len(prepared.train),
        len(prepared.holdout),
        current_flow_run_id(),
    )
    return prepared


@task(cache_policy=NO_CACHE, timeout_seconds=600)
def record_drift(cfg: EvergreenConfig, reference: pd.DataFrame | None, data: PreparedData) -> dict:
    """Per-feature shift (KS + PSI) of the new rows vs the champion's retention set.

    Recorded with the run (report file + metrics); informative, not a gate.
    """
    if reference is None or reference.empty or not cfg.data.features:
        return {}
    current = pd.concat([data.train, data.holdout], ignore_index=True)
    report = drift_report(reference, current, list(cfg.data.features))
    folder = cfg.home_path / "reports" / "drift"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{data.batch_ids[-1]}.md"
    path.write_text(report.summary())
    data.reports[f"drift/{data.batch_ids[-1]}.md"] = path
    get_run_logger().info(
        "drift: %d of %d features shifted (max PSI %.3f)",
        report.n_drifted,
        len(report.features),
        report.max_psi,
    )
    return {"drift.max_psi": report.max_psi, "drift.n_drifted": float(report.n_drifted)}
