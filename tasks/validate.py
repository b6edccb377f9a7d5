"""Validate: integrity blocks (quarantine), change informs (report, drift event); split by role."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from data_plane.gx_suite import ensure_suite
from data_plane.landing import data_columns
from data_plane.messages import ValidationReport, change_lines, clip_middle
from data_plane.profile import DataProfile
from data_plane.splits import ThreeWaySplit, content_hash, split_three_way
from data_plane.validation import save_report, validate_batch
from evergreen.config import DataConfig, EvergreenConfig
from tasks.common import current_flow_run_id
from tasks.events import emit
from tasks.ingest import RawBatch
from tasks.ledger import earlier_quarantine
from tasks.memory import BATCH_COLUMN, DataMemory, Remembered

QUARANTINE_REASON_LIMIT = 1200


def quarantine_reason(report: ValidationReport, report_file: Path | str) -> str:
    """Why a batch was quarantined, for the ledger and the run's result: the report's headline,
    clipped in the middle so that what to do (its end) and the report's path survive."""
    suffix = f" (report {report_file})"
    return clip_middle(report.headline(), QUARANTINE_REASON_LIMIT - len(suffix)) + suffix


@dataclass
class PreparedData:
    """The accepted part of a flow's input, split by role, and what validation said about it."""

    batch_ids: list[str]
    splits: dict[str, ThreeWaySplit] = field(default_factory=dict)
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)
    data_hash: str = ""
    reports: dict[str, Path] = field(default_factory=dict)
    quarantined: dict[str, str] = field(default_factory=dict)  # batch id → why
    verdict_keys: dict[str, dict[str, str]] = field(default_factory=dict)  # quarantined batches
    drift: dict[str, float] = field(default_factory=dict)
    data_docs: dict[str, str] = field(default_factory=dict)  # batch id → its Data Docs page

    @property
    def empty(self) -> bool:
        return not self.batch_ids

    def role(self, name: str) -> pd.DataFrame:
        """Rows of one role ("train", "select", "gate") over every accepted batch."""
        parts = [getattr(self.splits[b], name) for b in self.batch_ids]
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    @property
    def train(self) -> pd.DataFrame:
        return self.role("train")

    def accepted(self) -> list[Remembered]:
        """(batch id, split, frame) of each accepted batch: what the memory remembers."""
        return [(b, self.splits[b], self.frames[b]) for b in self.batch_ids]


def announce_quarantine(
    cadence: str, cfg: EvergreenConfig, report: ValidationReport, docs: str | None = None
) -> None:
    """Tell Prefect and the person on call at once: event, artifact, error log line (the ledger
    entry is written with the run's outcome)."""
    emit(
        "evergreen.batch.quarantined",
        cfg,
        {"batch_id": report.batch_id, "cadence": cadence, "reason": report.headline()},
    )
    create_markdown_artifact(
        key=f"quarantine-{cadence}",
        markdown=report.summary()
        + (f"\n\n[Great Expectations Data Docs]({docs})\n" if docs else ""),
        description=f"Batch {report.batch_id} quarantined",
    )
    get_run_logger().error("batch %s quarantined: %s", report.batch_id, report.headline())


def verdict_fingerprint(batch: RawBatch, suite_file: Path, data_cfg: DataConfig) -> str:
    """What a quarantine rests on: the batch's content (or why it could not be read), the
    integrity suite and the data config. Equal fingerprints give the same integrity verdict, so a
    batch one cadence quarantined is not validated and announced again by the next cadence; a
    batch fixed in place, an edited suite or a changed `data` section give a new fingerprint."""
    digest = hashlib.sha256(suite_file.read_bytes())
    digest.update(data_cfg.model_dump_json().encode("utf-8"))
    if batch.frame is not None:
        digest.update("\x1f".join(map(str, batch.frame.columns)).encode("utf-8"))
        digest.update(pd.util.hash_pandas_object(batch.frame, index=False).to_numpy().tobytes())
    else:
        digest.update(str(batch.read_error).encode("utf-8"))
    return digest.hexdigest()[:32]


def verdict_keys(batch: RawBatch, fingerprint: Callable[[], str]) -> dict[str, str]:
    """What a quarantine's ledger entry records besides its reason: the verdict's `fingerprint`
    (content, suite, data config: whether another cadence may reuse the verdict) and the files'
    `listing` when the batch was read (whether the batch changed in place since)."""
    return {"fingerprint": fingerprint(), **({"listing": batch.listing} if batch.listing else {})}


def _known_quarantine(
    cfg: EvergreenConfig, batch: RawBatch, fingerprint: Callable[[], str]
) -> str | None:
    """The reason a cadence (another, or this one before the files were touched) quarantined
    this very content (same fingerprint), logged once more as a warning here; None when it must
    be validated."""
    earlier = earlier_quarantine(cfg, batch.batch_id, fingerprint)
    if earlier is None:
        return None
    reason = earlier.details.get("reason", "")
    get_run_logger().warning(
        "batch %s stays quarantined: %s quarantined it at %s and its content, the suite and the "
        "data config are unchanged (not announced again; fix the files in place, or re-validate "
        "with `evergreen run <cadence> --batch ID --force`, in Prefect batch_ids=[ID], "
        "force=true): %s",
        batch.batch_id,
        earlier.cadence,
        earlier.at,
        reason,
    )
    return reason or f"quarantined by {earlier.cadence} at {earlier.at}"


def _reference_rows(memory: DataMemory) -> pd.DataFrame | None:
    """A sample of the accepted data (held-out rows of every role) for KS/PSI drift."""
    parts = [f for f in memory.held_out.values() if f is not None and not f.empty]
    return pd.concat(parts, ignore_index=True) if parts else None


@task(cache_policy=NO_CACHE, timeout_seconds=900)
def validate_batches(
    cfg: EvergreenConfig,
    cadence: str,
    raw: list[RawBatch],
    memory: DataMemory,
    *,
    recheck: bool = False,
) -> PreparedData:
    """Validate each batch against the suite and the accepted data so far; quarantine what is
    corrupt, report what changed, split the rest into train / select / gate rows.

    A batch another cadence already quarantined with the same fingerprint stays quarantined
    without a second validation or alert (the person on call hears of a bad batch once), unless
    `recheck` (a forced run) asks for a fresh verdict."""
    suite_file = ensure_suite(cfg.home_path, cfg.data)
    report_dir = cfg.home_path / "reports" / "validation" / cadence
    columns = data_columns(cfg.data)
    reference = _reference_rows(memory)
    profile: DataProfile = memory.profile
    prepared = PreparedData([])
    for batch in raw:
        # hashed only for a batch some cadence quarantined or quarantines now
        fingerprint = cache(partial(verdict_fingerprint, batch, suite_file, cfg.data))
        known = None if recheck else _known_quarantine(cfg, batch, fingerprint)
        if known is not None:
            prepared.quarantined[batch.batch_id] = known
            prepared.verdict_keys[batch.batch_id] = verdict_keys(batch, fingerprint)
            continue
        if batch.frame is None:
            assert batch.read_error is not None  # RawBatch: a frame, or why there is none
            report = ValidationReport.from_read_error(batch.batch_id, batch.read_error)
        else:
            report = validate_batch(
                batch.frame,
                batch.batch_id,
                cfg.data,
                suite_file,
                profile=profile,
                reference=reference,
                gx_project=cfg.home_path,  # suites, checkpoints, results, Data Docs: <home>/gx
            )
        files = save_report(report, report_dir)
        prepared.reports[f"validation/{batch.batch_id}.json"] = files[0]
        prepared.reports[f"validation/{batch.batch_id}.md"] = files[1]
        docs = report.statistics.get("data_docs")
        if docs:
            prepared.data_docs[batch.batch_id] = docs
        create_markdown_artifact(
            key=f"validation-{cadence}",
            markdown=report.summary()
            + (f"\n\n[Great Expectations Data Docs]({docs})\n" if docs else ""),
            description=f"Great Expectations: batch {batch.batch_id}",
        )
        if not report.success:
            announce_quarantine(cadence, cfg, report, docs)
            prepared.quarantined[batch.batch_id] = quarantine_reason(report, files[1])
            prepared.verdict_keys[batch.batch_id] = verdict_keys(batch, fingerprint)
            continue
        _inform(cfg, cadence, report, files[1])
        drift = report.statistics.get("drift") or {}
        for key in ("max_psi", "n_drifted"):
            if key in drift:
                name = f"drift.{key}"
                prepared.drift[name] = max(prepared.drift.get(name, 0.0), float(drift[key]))
        assert batch.frame is not None  # an unreadable batch never validates
        frame = batch.frame[columns].copy()
        prepared.batch_ids.append(batch.batch_id)
        prepared.frames[batch.batch_id] = frame
        prepared.splits[batch.batch_id] = _split(
            cfg, frame.assign(**{BATCH_COLUMN: batch.batch_id})
        )
        hint = held_out_hint(cfg, batch.batch_id, prepared.splits[batch.batch_id])
        if hint:
            get_run_logger().info(hint)
        profile = profile.updated(
            frame,
            cfg.data.features,
            cfg.data.label,
            batch_id=batch.batch_id,
            columns=data_columns(cfg.data),
        )
    if prepared.batch_ids:
        whole = pd.concat(prepared.frames.values(), ignore_index=True)
        prepared.data_hash = content_hash(whole, columns)[:16]
        get_run_logger().info(
            "accepted %s: %d train / %d select / %d gate rows (flow run %s)",
            prepared.batch_ids,
            len(prepared.train),
            len(prepared.role("select")),
            len(prepared.role("gate")),
            current_flow_run_id(),
        )
    return prepared


HELD_OUT_HINT_RATIO = 10


def held_out_hint(cfg: EvergreenConfig, batch_id: str, split: ThreeWaySplit) -> str | None:
    """A hint when a large batch holds out far more rows than the memory keeps: held-out rows
    never train, so most of them are lost to training for one gate decision (README, "Large
    batches: lower the fractions"). None when the fractions suit the batch."""
    kept = cfg.memory.held_out_per_batch
    held = len(split.select) + len(split.gate)
    if held < HELD_OUT_HINT_RATIO * 2 * kept:
        return None
    n_rows = held + len(split.train)
    suggest = max(kept / n_rows, 0.005)
    return (
        f"batch {batch_id}: {held} of {n_rows} rows are held out (never trained on) and the "
        f"memory keeps {kept} per role; with batches this large, data.select_fraction and "
        f"data.gate_fraction of about {suggest:.3f} each would train on the rest"
    )


def _split(cfg: EvergreenConfig, frame: pd.DataFrame) -> ThreeWaySplit:
    return split_three_way(
        frame,
        data_columns(cfg.data),
        select_fraction=cfg.data.select_fraction,
        gate_fraction=cfg.data.gate_fraction,
        salt=cfg.data.split_salt,
    )


def _inform(
    cfg: EvergreenConfig, cadence: str, report: ValidationReport, report_file: Path | str
) -> None:
    """Log what changed; a batch-wide drift also tells Prefect, which may start an update."""
    logger = get_run_logger()
    for line in change_lines(report, str(report_file)):
        logger.warning("batch %s changed: %s", report.batch_id, line)
    drift = report.statistics.get("drift") or {}
    n_features = drift.get("n_features") or 0
    if n_features and drift["n_drifted"] / n_features >= cfg.data.change.drift_event_share:
        emit(
            "evergreen.drift.detected",
            cfg,
            {
                "batch_id": report.batch_id,
                "source": f"validation:{cadence}",
                "statistic": "psi",
                "n_drifted": drift["n_drifted"],
                "max_psi": drift["max_psi"],
            },
        )
