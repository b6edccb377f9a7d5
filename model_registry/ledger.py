"""The batch ledger: which batches each cadence processed, as append-only records in MLflow.

`Ledger` is written beside the registry's promotion history
(`model_registry.promotion_history`); both are records of `model_registry.run_log.RunLog`. Each
record is one small, finished MLflow run (tags only, no artifacts) in ONE bookkeeping experiment,
`<experiment>-records`, tagged `evergreen.record` = `ledger` or `promotion` (filter on it in the
MLflow UI), so the experiments list holds the training runs and not one experiment per kind of
bookkeeping. Records written by earlier releases in `<experiment>-ledger` /
`<experiment>-registry` are still read (`legacy`), never moved. Runs need no schema of our own,
survive process restarts, work through a remote `mlflow server` exactly like against the
embedded SQLite store, and show up in the MLflow UI.
Records are ordered by a `seq` metric (microseconds since the epoch, strictly increasing per
writer), so two records written within the same millisecond still have a defined order.

A batch counts as processed for a cadence when its latest entry is promoted, rejected or
quarantined; failed runs (a crash, a lost race) are retried by the next run, and skipped
entries are informational.

Flat cost as history grows: `Ledger.latest_outcomes` (what every flow start asks) reads the
cadence's newest *summary* record (kind `ledger-summary`: batch → latest outcome, zlib-compressed
in a few tags, plus `covers`, the highest seq folded into it) and only the records written after
it (`metrics.seq > covers`), never the whole history. Writers compact (`Ledger.compact`): once
`compact_after` records older than `settle_seconds` sit after the summary, a new summary folds
them in. The settle window keeps a record whose write was delayed (retries, clock skew between
writers) from being overtaken by a summary; summaries are a cache of the records, which stay the
truth (`processed`, `entries` and the MLflow UI read them as before).
"""

from __future__ import annotations

import base64
import json
import logging
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

from mlflow import MlflowClient
from mlflow.entities import Run

from model_registry.run_log import (
    SEQ_METRIC,
    RunLog,
    default_artifact_location,
    is_remote,
    now_iso,
    quote,
    records_experiment,
    run_seq,
)

if TYPE_CHECKING:
    from evergreen.config import EvergreenConfig

log = logging.getLogger(__name__)

Outcome = Literal["promoted", "rejected", "quarantined", "failed", "skipped"]
OUTCOMES: tuple[str, ...] = get_args(Outcome)
DONE_OUTCOMES = frozenset({"promoted", "rejected", "quarantined"})
# between the sentences of an entry's `reasons` (written by tasks.outcome, read by status)
REASONS_SEPARATOR = " | "
SUMMARY_KIND = "ledger-summary"
COVERS_TAG = "evergreen.summary.covers"
PARTS_TAG = "evergreen.summary.parts"
PART_TAG = "evergreen.summary.part."
_PART_CHARS = 7500  # MLflow caps a tag value at 8000 characters
_MAX_PARTS = 90  # log_batch takes at most 100 tags: ~500 kB compressed, millions of batches
SETTLE_SECONDS = 300.0
COMPACT_AFTER = 20


@dataclass
class LedgerEntry:
    """One outcome for one batch on one cadence."""

    cadence: str
    batch_id: str
    outcome: str
    at: str
    run_id: str | None = None
    details: dict[str, str] = field(default_factory=dict)


class Ledger:
    """Per-cadence record of processed batches (at most once per cadence unless forced)."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        experiment: str = "evergreen-records",
        artifact_location: str | None = None,
        legacy: tuple[str, ...] = (),
        settle_seconds: float = SETTLE_SECONDS,
        compact_after: int = COMPACT_AFTER,
    ) -> None:
        self.tracking_uri = tracking_uri
        location = artifact_location or default_artifact_location(tracking_uri)
        client = MlflowClient(tracking_uri)
        where = None if is_remote(tracking_uri) else location
        self.log = RunLog(client, experiment, where, kind="ledger", legacy=legacy)
        self.summaries = RunLog(client, experiment, where, kind=SUMMARY_KIND)
        self.settle_seconds = settle_seconds
        self.compact_after = compact_after

    @classmethod
    def from_config(cls, cfg: EvergreenConfig) -> Ledger:
        """The ledger of the configured store (experiment `<experiment>-records`; entries an
        earlier release wrote to `<experiment>-ledger` still count)."""
        return cls(
            cfg.tracking_uri,
            experiment=records_experiment(cfg.registry.experiment),
            artifact_location=cfg.artifact_location,
            legacy=(f"{cfg.registry.experiment}-ledger",),
        )

    def record(
        self,
        cadence: str,
        batch_id: str,
        outcome: Outcome,
        *,
        details: dict[str, str] | None = None,
        run_id: str | None = None,
    ) -> LedgerEntry:
        """Append an outcome for a batch (later entries supersede earlier ones).

        Args:
            cadence: e.g. "daily".
            batch_id: the landing-zone folder name.
            outcome: one of promoted, rejected, quarantined, failed, skipped.
            details: free-form strings (reasons, version, file names).
            run_id: the MLflow run that did the work, if any.

        Raises:
            ValueError: unknown outcome, or a quote in cadence/batch_id.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"ledger outcome {outcome!r} is not one of {list(OUTCOMES)}")
        for value in (cadence, batch_id):
            quote(value)
        entry = LedgerEntry(cadence, batch_id, outcome, now_iso(), run_id, dict(details or {}))
        tags = {
            "evergreen.cadence": cadence,
            "evergreen.batch_id": batch_id,
            "evergreen.outcome": outcome,
            "evergreen.at": entry.at,
            "evergreen.details": json.dumps(entry.details, sort_keys=True, default=str),
        }
        if run_id:
            tags["evergreen.run_id"] = run_id
        self.log.append(tags, run_name=f"{cadence}-{batch_id}-{outcome}")
        return entry

    def entries(self, cadence: str | None = None, limit: int = 200) -> list[LedgerEntry]:
        """Entries newest first, optionally of one cadence."""
        return [_entry(r) for r in self.log.search(_cadence_filter(cadence), limit)]

    def processed(self, cadence: str) -> dict[str, LedgerEntry]:
        """The latest entry of every batch this cadence has seen (done or not)."""
        latest: dict[str, LedgerEntry] = {}
        for run in self.log.search(_cadence_filter(cadence)):
            entry = _entry(run)
            latest.setdefault(entry.batch_id, entry)
        return latest

    def latest_outcomes(self, cadence: str) -> dict[str, str]:
        """batch → its latest outcome on `cadence`: the newest summary plus the records after it
        (what `processed` says, at a cost that does not grow with the number of records)."""
        summary, covers = self._summary(cadence)
        return _fold(summary, self._after(cadence, covers))

    def compact(self, cadence: str) -> bool:
        """Fold the settled records after the newest summary into a new summary, once there are
        at least `compact_after` of them; True when a summary was written.

        Settled: older than `settle_seconds`, so a record written late (its seq was taken before
        a slow write) still lands after the summary's `covers` and is read.
        """
        summary, covers = self._summary(cadence)
        horizon = time.time_ns() // 1000 - int(self.settle_seconds * 1_000_000)
        settled = [run for run in self._after(cadence, covers) if run_seq(run) <= horizon]
        if len(settled) < self.compact_after:
            return False
        parts = _encode(_fold(summary, settled))
        if len(parts) > _MAX_PARTS:  # far beyond any real ledger: keep reading the records
            return False
        tags = {
            "evergreen.cadence": cadence,
            COVERS_TAG: str(max(run_seq(run) for run in settled)),
            PARTS_TAG: str(len(parts)),
            **{f"{PART_TAG}{i}": part for i, part in enumerate(parts)},
        }
        self.summaries.append(tags, run_name=f"{cadence}-ledger-summary")
        return True

    def _summary(self, cadence: str) -> tuple[dict[str, str], int | None]:
        """The newest summary of `cadence` and the seq it covers (({}, None) before the first)."""
        runs = self.summaries.search(_cadence_filter(cadence), limit=1)
        if not runs:
            return {}, None
        tags = runs[0].data.tags
        parts = [tags[f"{PART_TAG}{i}"] for i in range(int(tags[PARTS_TAG]))]
        return _decode(parts), int(tags[COVERS_TAG])

    def _after(self, cadence: str, covers: int | None) -> list[Run]:
        """The cadence's records newer than `covers` (all of them when None), newest first."""
        where = _cadence_filter(cadence)
        if covers is not None:
            where += f" and metrics.{SEQ_METRIC} > {covers}"
        return self.log.search(where)

    def latest(self, cadence: str, batch_id: str) -> LedgerEntry | None:
        """The batch's latest entry on `cadence` (None: it has none)."""
        where = f"{_cadence_filter(cadence)} and tags.`evergreen.batch_id` = {quote(batch_id)}"
        runs = self.log.search(where, limit=1)
        return _entry(runs[0]) if runs else None

    def earlier_quarantine(
        self, batch_id: str, fingerprint: str | Callable[[], str], *, limit: int = 20
    ) -> LedgerEntry | None:
        """The newest quarantine of `batch_id`, by any cadence, whose verdict rested on the same
        `fingerprint` (content, suite, data config); None if there is none.

        Another cadence's: the verdict this cadence would reach. This cadence's own: a batch
        taken again because its files were touched (`changed_quarantines`) with the same content.
        One filtered search, newest first: a batch holds a handful of quarantine records at most.
        A callable `fingerprint` is computed only when the batch was quarantined (a clean batch,
        the usual case, is not hashed for the look-up).
        """
        where = (
            f"tags.`evergreen.batch_id` = {quote(batch_id)}"
            " and tags.`evergreen.outcome` = 'quarantined'"
        )
        earlier = [_entry(run) for run in self.log.search(where, limit)]
        if not earlier:
            return None
        wanted = fingerprint() if callable(fingerprint) else fingerprint
        return next((e for e in earlier if e.details.get("fingerprint") == wanted), None)

    def changed_quarantines(self, cadence: str, listings: Mapping[str, str]) -> set[str]:
        """Of the batches in `listings` (batch → its files' listing signature now), those whose
        newest quarantine on `cadence` recorded a different listing: fixed in place since.
        Entries without a listing (earlier releases) stay quarantined. One filtered search."""
        if not listings:
            return set()
        where = f"{_cadence_filter(cadence)} and tags.`evergreen.outcome` = 'quarantined'"
        newest: dict[str, LedgerEntry] = {}
        for entry in map(_entry, self.log.search(where)):
            newest.setdefault(entry.batch_id, entry)
        changed = {
            batch_id
            for batch_id, listing in listings.items()
            if batch_id in newest and newest[batch_id].details.get("listing") not in (None, listing)
        }
        for batch_id in sorted(changed):
            log.warning(  # in-place edits of landed data deserve a look
                "batch %s changed since %s quarantined it: validating it again", batch_id, cadence
            )
        return changed

    def is_processed(self, cadence: str, batch_id: str) -> bool:
        """True when the batch's latest entry is promoted, rejected or quarantined."""
        latest = self.latest(cadence, batch_id)
        return latest is not None and latest.outcome in DONE_OUTCOMES


def _cadence_filter(cadence: str | None) -> str:
    return "" if cadence is None else f"tags.`evergreen.cadence` = {quote(cadence)}"


def _fold(summary: dict[str, str], newest_first: list[Run]) -> dict[str, str]:
    """`summary` updated by records newer than it (the first record seen per batch wins)."""
    latest = dict(summary)
    seen: set[str] = set()
    for run in newest_first:
        tags = run.data.tags
        batch_id = tags.get("evergreen.batch_id", "")
        if batch_id not in seen:
            seen.add(batch_id)
            latest[batch_id] = tags.get("evergreen.outcome", "")
    return latest


def _encode(latest: dict[str, str]) -> list[str]:
    """batch → outcome as zlib-compressed, base64 lines ("outcome\tbatch"), in tag-sized parts."""
    text = "\n".join(f"{outcome}\t{batch}" for batch, outcome in sorted(latest.items()))
    packed = base64.b64encode(zlib.compress(text.encode(), 9)).decode("ascii")
    return [packed[i : i + _PART_CHARS] for i in range(0, len(packed), _PART_CHARS)] or [""]


def _decode(parts: list[str]) -> dict[str, str]:
    """The inverse of `_encode`."""
    text = zlib.decompress(base64.b64decode("".join(parts))).decode() if any(parts) else ""
    return {
        batch: outcome
        for outcome, batch in (line.split("\t", 1) for line in text.splitlines() if line)
    }


def _entry(run: Run) -> LedgerEntry:
    tags = run.data.tags
    try:
        details = json.loads(tags.get("evergreen.details", "{}"))
    except json.JSONDecodeError:  # a truncated tag (MLflow caps values): keep what is readable
        details = {"raw": tags.get("evergreen.details", "")}
    return LedgerEntry(
        cadence=tags.get("evergreen.cadence", ""),
        batch_id=tags.get("evergreen.batch_id", ""),
        outcome=tags.get("evergreen.outcome", ""),
        at=tags.get("evergreen.at", ""),
        run_id=tags.get("evergreen.run_id"),
        details={str(k): str(v) for k, v in details.items()},
    )
