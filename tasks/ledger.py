"""The batch ledger's one writer: which cadence processed, quarantined or failed which batch.

Every ledger entry of a flow run is written here (`model_registry.ledger.Ledger` is the storage):
the run's outcome per batch (`tasks.outcome.conclude`), a crash (`record_failed`), an earlier
attempt that ended without an entry (`record_interrupted`, found by `tasks.attempts.reconcile`),
and the first champion's batches counting as processed for every cadence that consumes batches
(`record_consumed`). Whether a batch is pending is decided by `pending_for` alone. Recording a
run's outcome removes its attempt marker (`tasks.attempts`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from data_plane.arrival import listing_signature
from data_plane.landing import ObjectInfo
from evergreen.cadences import batch_consumers
from evergreen.config import EvergreenConfig
from model_registry.ledger import Ledger, LedgerEntry, Outcome
from tasks import attempts


def record(
    cfg: EvergreenConfig,
    cadence: str,
    batch_ids: Iterable[str],
    outcome: Outcome,
    *,
    details: Mapping[str, str] | None = None,
    forced: bool = False,
) -> None:
    """Append `outcome` for each batch (a forced rerun says so in its details); the run's
    attempt marker of this cadence is done with."""
    ledger = Ledger.from_config(cfg)
    extra = {**(details or {}), **({"forced": "true"} if forced else {})}
    for batch_id in batch_ids:
        ledger.record(cadence, batch_id, outcome, details=extra)
    attempts.finish(cfg, cadence)
    ledger.compact(cadence)  # keeps `processed` reading a bounded number of records


def record_failed(cfg: EvergreenConfig, cadence: str, batch_ids: Iterable[str], error: str) -> None:
    """A crash while training, evaluating or registering: the batches stay pending."""
    record(cfg, cadence, batch_ids, "failed", details={"error": error[:2000]})


def record_interrupted(
    ledger: Ledger, cadence: str, batch_ids: Iterable[str], reason: str, details: Mapping[str, str]
) -> None:
    """An earlier run's attempt ended without an entry (killed, or the disk was full when it
    failed): `failed` with the reason found, so the batches stay pending and the attempt shows."""
    for batch_id in batch_ids:
        ledger.record(cadence, batch_id, "failed", details={**details, "error": reason[:2000]})
    ledger.compact(cadence)


def record_consumed(cfg: EvergreenConfig, batch_ids: Iterable[str], version: str) -> None:
    """The first champion learned these batches: they are not new to any update cadence."""
    batches = list(batch_ids)
    for cadence in batch_consumers():
        record(cfg, cadence, batches, "promoted", details={"by": "bootstrap", "version": version})


def earlier_quarantine(
    cfg: EvergreenConfig, batch_id: str, fingerprint: Callable[[], str]
) -> LedgerEntry | None:
    """A quarantine of this batch on the same content, suite and data config: the verdict this
    cadence would reach (`Ledger.earlier_quarantine`)."""
    return Ledger.from_config(cfg).earlier_quarantine(batch_id, fingerprint)


def processed(
    cfg: EvergreenConfig,
    cadence: str,
    listing: Mapping[str, Sequence[ObjectInfo]] | None = None,
) -> set[str]:
    """Batches `cadence` is done with: the latest entry is anything but `failed`, and for a
    quarantined batch, its files are as they were when it was quarantined (`listing`: the
    landing zone's files now, `LandingZone.scan`; a batch fixed in place is taken again).

    Read from the cadence's ledger summary and the records after it (`Ledger.latest_outcomes`),
    so a flow start does not read the whole history; only the cadence's quarantined batches are
    signed (`listing_signature`) and their quarantine records searched.
    """
    ledger = Ledger.from_config(cfg)
    latest = ledger.latest_outcomes(cadence)
    done = {b for b, outcome in latest.items() if outcome != "failed"}
    quarantined = {
        batch_id: listing_signature(objects)
        for batch_id, objects in (listing or {}).items()
        if latest.get(batch_id) == "quarantined"
    }
    return done - ledger.changed_quarantines(cadence, quarantined)
