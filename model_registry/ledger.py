"""Append-only records in MLflow: the batch ledger and the registry's promotion history.

`Ledger` says which batches each cadence processed; `PromotionHistory` holds every champion
change of a registered model (what `Registry.rollback` and `evergreen status` read). Each record
is one small, finished MLflow run (tags only, no artifacts) in ONE bookkeeping experiment,
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
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from mlflow import MlflowClient
from mlflow.entities import Metric, Run, RunTag, ViewType
from mlflow.exceptions import MlflowException

if TYPE_CHECKING:
    from evergreen.config import EvergreenConfig

log = logging.getLogger(__name__)

Outcome = Literal["promoted", "rejected", "quarantined", "failed", "skipped"]
OUTCOMES: tuple[str, ...] = get_args(Outcome)
DONE_OUTCOMES = frozenset({"promoted", "rejected", "quarantined"})
# between the sentences of an entry's `reasons` (written by tasks.outcome, read by status)
REASONS_SEPARATOR = " | "
SEQ_METRIC = "seq"
RECORD_TAG = "evergreen.record"
RECORDS_SUFFIX = "-records"
_PAGE = 1000
SUMMARY_KIND = "ledger-summary"
COVERS_TAG = "evergreen.summary.covers"
PARTS_TAG = "evergreen.summary.parts"
PART_TAG = "evergreen.summary.part."
_PART_CHARS = 7500  # MLflow caps a tag value at 8000 characters
_MAX_PARTS = 90  # log_batch takes at most 100 tags: ~500 kB compressed, millions of batches
SETTLE_SECONDS = 300.0
COMPACT_AFTER = 20
_REMOTE_SCHEMES = ("http://", "https://", "databricks")


def default_artifact_location(tracking_uri: str) -> str | None:
    """Where a client-side store keeps artifacts when none is configured.

    SQLite stores get `mlartifacts/` beside the database file (never MLflow's `./mlruns`
    relative to whatever the current directory is); servers decide for themselves (None).
    """
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix):
        return (Path(tracking_uri[len(prefix) :]).resolve().parent / "mlartifacts").as_uri()
    return None


def is_remote(tracking_uri: str) -> bool:
    """True for tracking servers (they choose artifact locations), False for client-side stores."""
    return tracking_uri.startswith(_REMOTE_SCHEMES)


def now_iso() -> str:
    """UTC timestamp with microseconds, e.g. 2026-11-21T04:00:00.123456+00:00."""
    return datetime.now(UTC).isoformat()


def quote(value: str) -> str:
    """A value for an MLflow filter string, single-quoted.

    Raises:
        ValueError: the value contains a quote (MLflow filter strings cannot escape it).
    """
    if "'" in value or '"' in value:
        raise ValueError(f"{value!r}: quotes are not allowed in names used for searching")
    return f"'{value}'"


class RunLog:
    """An append-only log of small records of one `kind`, each a finished, tags-only MLflow run.

    Several kinds share an experiment (each record carries `evergreen.record = kind`); `legacy`
    experiments hold records of this kind from before the sharing (no kind tag) and are read too.
    """

    _last_seq = 0
    _seq_lock = threading.Lock()

    def __init__(
        self,
        client: MlflowClient,
        experiment: str,
        artifact_location: str | None,
        *,
        kind: str | None = None,
        legacy: tuple[str, ...] = (),
    ) -> None:
        self.client = client
        self.experiment = experiment
        self.artifact_location = artifact_location
        self.kind = kind
        self.legacy = legacy
        self._experiment_id: str | None = None

    def experiment_id(self, *, create: bool = True) -> str | None:
        """The log's experiment id; created (or restored) on first write, None before that."""
        if self._experiment_id is None:
            if create:
                self._experiment_id = ensure_experiment(
                    self.client, self.experiment, self.artifact_location
                )
            else:
                found = self.client.get_experiment_by_name(self.experiment)
                return found.experiment_id if found else None
        return self._experiment_id

    def append(self, tags: dict[str, str], *, run_name: str, after: int = 0) -> str:
        """Write one record and return its run id.

        Its `seq` is now in µs, strictly above `after` and above every seq this process issued.
        """
        seq = self.next_seq(after)
        run = self.client.create_run(str(self.experiment_id()), run_name=run_name)
        stamp = int(time.time() * 1000)
        kind = {RECORD_TAG: self.kind} if self.kind else {}
        self.client.log_batch(
            run.info.run_id,
            metrics=[Metric(SEQ_METRIC, float(seq), stamp, 0)],
            tags=[RunTag(k, str(v)) for k, v in {**tags, **kind}.items()],
        )
        # update_run, not set_terminated: that one prints "View run …" to stdout on servers.
        self.client.update_run(run.info.run_id, status="FINISHED")
        run_id: str = run.info.run_id
        return run_id

    @classmethod
    def next_seq(cls, floor: int) -> int:
        """Microseconds since the epoch, above `floor` and above every seq this process issued."""
        with cls._seq_lock:
            cls._last_seq = max(time.time_ns() // 1000, floor + 1, cls._last_seq + 1)
            return cls._last_seq

    def search(self, filter_string: str, limit: int | None = None) -> list[Run]:
        """Records matching `filter_string`, newest (highest seq) first; all when limit=None."""
        runs = self._search_in(self.experiment_id(create=False), self._scoped(filter_string), limit)
        for name in self.legacy:  # reading never creates anything
            found = self.client.get_experiment_by_name(name)
            if found is not None and found.lifecycle_stage == "active":
                runs += self._search_in(found.experiment_id, filter_string, limit)
        if self.legacy:
            runs.sort(key=lambda r: (run_seq(r), r.info.start_time), reverse=True)
        return runs if limit is None else runs[:limit]

    def _scoped(self, filter_string: str) -> str:
        if not self.kind:
            return filter_string
        scope = f"tags.`{RECORD_TAG}` = {quote(self.kind)}"
        return f"{scope} and {filter_string}" if filter_string else scope

    def _search_in(
        self, experiment_id: str | None, filter_string: str, limit: int | None
    ) -> list[Run]:
        runs: list[Run] = []
        token = None
        while experiment_id is not None:
            want = _PAGE if limit is None else min(_PAGE, limit - len(runs))
            if want <= 0:
                break
            page = self.client.search_runs(
                [experiment_id],
                filter_string=filter_string,
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=want,
                order_by=[f"metrics.{SEQ_METRIC} DESC", "attributes.start_time DESC"],
                page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                break
        return runs


def records_experiment(experiment: str) -> str:
    """The one bookkeeping experiment beside the training runs' `experiment`."""
    return f"{experiment}{RECORDS_SUFFIX}"


def run_seq(run: Run) -> int:
    """The ordering key of a record written by `RunLog.append`."""
    return int(run.data.metrics.get(SEQ_METRIC, 0))


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """Get or create experiment `name` (restoring it if deleted); safe against a racing creator."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as exc:  # another process created it first
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise exc from None
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


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


@dataclass
class PromotionEvent:
    """One champion change: who moved the alias from which version to which, when and why."""

    at: str
    action: str  # "promote" | "rollback" | "manual" (a hand move noticed by reconciliation)
    version: str
    previous: str | None
    actor: str
    reason: str
    flow_run_id: str | None


class PromotionHistory:
    """The champion changes of one registered model (runs tagged with its name)."""

    def __init__(self, log: RunLog, model_name: str) -> None:
        self.log = log
        self.model_name = model_name
        self._filter = f"tags.`evergreen.model` = {quote(model_name)}"

    def record(self, event: PromotionEvent) -> None:
        """Append an event, ordered after every event already recorded (call under the lock)."""
        latest = self.log.search(self._filter, limit=1)
        fields = {"model": self.model_name, **{k: v for k, v in vars(event).items() if v}}
        tags = {f"evergreen.{k}": str(v)[:5000] for k, v in fields.items()}
        after = run_seq(latest[0]) if latest else 0
        self.log.append(tags, run_name=f"{event.action}-v{event.version}", after=after)

    def events(self, limit: int | None = None) -> list[PromotionEvent]:
        """Events newest first (all of them when limit=None)."""
        return [_promotion_event(run.data.tags) for run in self.log.search(self._filter, limit)]


def _promotion_event(tags: dict[str, str]) -> PromotionEvent:
    def get(key: str) -> str:
        return tags.get(f"evergreen.{key}", "")

    return PromotionEvent(
        at=get("at"),
        action=get("action"),
        version=get("version"),
        previous=get("previous") or None,
        actor=get("actor"),
        reason=get("reason"),
        flow_run_id=get("flow_run_id") or None,
    )


def rollback_target(events: Iterable[PromotionEvent], current: str) -> str | None:
    """The champion to restore when rolling back from `current` (pure, tested directly).

    Each version's predecessor is the `previous` of its latest promotion (the champion it was
    gated against). Walk that chain from `current`, skipping versions that were rolled back
    from and not made champion again since; stop at a cycle or the start of the history.
    """
    predecessor: dict[str, str | None] = {}
    rolled_back_from: set[str] = set()
    for event in events:
        if event.action in ("promote", "manual"):
            predecessor[event.version] = event.previous
        elif event.action == "rollback" and event.previous is not None:
            rolled_back_from.add(event.previous)
        rolled_back_from.discard(event.version)
    seen = {current}
    candidate = predecessor.get(current)
    while candidate is not None and candidate not in seen:
        if candidate not in rolled_back_from:
            return candidate
        seen.add(candidate)
        candidate = predecessor.get(candidate)
    return None
