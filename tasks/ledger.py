"""The batch ledger's one writer: which cadence processed, quarantined or failed which batch.

Every ledger entry of a flow run is written here (`model_registry.ledger.Ledger` is the storage):
the run's outcome per batch (`tasks.outcome.conclude`), a crash (`record_failed`), and the first
champion's batches counting as processed for every cadence that consumes batches
(`record_consumed`). Whether a batch is pending is decided by `pending_for` alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from evergreen.cadences import batch_consumers
from evergreen.config import EvergreenConfig
from model_registry.ledger import Ledger, Outcome


def record(
    cfg: EvergreenConfig,
    cadence: str,
    batch_ids: Iterable[str],
    outcome: Outcome,
    *,
    details: Mapping[str, str] | None = None,
    forced: bool = False,
) -> None:
    """Append `outcome` for each batch (a forced rerun says so in its details)."""
    ledger = Ledger.from_config(cfg)
    extra = {**(details or {}), **({"forced": "true"} if forced else {})}
    for batch_id in batch_ids:
        ledger.record(cadence, batch_id, outcome, details=extra)
    ledger.compact(cadence)  # keeps `processed` reading a bounded number of records


def record_failed(cfg: EvergreenConfig, cadence: str, batch_ids: Iterable[str], error: str) -> None:
    """A crash while training, evaluating or registering: the batches stay pending."""
    record(cfg, cadence, batch_ids, "failed", details={"error": error[:2000]})


def record_consumed(cfg: EvergreenConfig, batch_ids: Iterable[str], version: str) -> None:
    """The first champion learned these batches: they are not new to any update cadence."""
    batches = list(batch_ids)
    for cadence in batch_consumers():
        record(cfg, cadence, batches, "promoted", details={"by": "bootstrap", "version": version})


def processed(cfg: EvergreenConfig, cadence: str) -> set[str]:
    """Batches `cadence` is done with: the latest entry is anything but `failed`.

    Read from the cadence's ledger summary and the records after it (`Ledger.latest_outcomes`),
    so a flow start does not read the whole history.
    """
    latest = Ledger.from_config(cfg).latest_outcomes(cadence)
    return {b for b, outcome in latest.items() if outcome != "failed"}
