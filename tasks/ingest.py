"""Ingest: find the batches a cadence has not processed yet and read them from the landing zone."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from prefect import get_run_logger, task
from prefect.tasks import exponential_backoff

from data_plane.arrival import listing_signature
from data_plane.landing import BatchReadError, open_landing, read_batch
from evergreen.config import EvergreenConfig
from evergreen.pending import BatchSelection, choose_batches
from model_registry.fault_hooks import hang_here

__all__ = ["BatchSelection", "RawBatch", "discover_batches", "read_batches"]


@dataclass
class RawBatch:
    """One batch as read from the landing zone: a frame, or the reason it could not be read;
    `listing`, its files as listed just before the read (`arrival.listing_signature`): a
    quarantine records it, and a later listing that differs means the batch was fixed in place."""

    batch_id: str
    frame: pd.DataFrame | None
    read_error: BatchReadError | None = None
    listing: str | None = None


@task(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), timeout_seconds=300)
def discover_batches(cfg: EvergreenConfig, cadence: str, selection: BatchSelection) -> list[str]:
    """Batches this cadence still has to process, in batch_id order (the ledger says which)."""
    chosen = choose_batches(cfg, cadence, selection)
    logger = get_run_logger()
    if selection.force and not selection.batch_ids and len(chosen) > 1:
        logger.warning(  # a forced rerun usually means one batch: say when it means all of them
            "%s: forced without batch ids: retaking every arrived batch (%d), processed or not;"
            " name the batches (--batch ID) to retake only those",
            cadence,
            len(chosen),
        )
    logger.info("%s: %d batch(es) to process: %s", cadence, len(chosen), chosen)
    return chosen


@task(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), timeout_seconds=900)
def read_batches(cfg: EvergreenConfig, batch_ids: list[str]) -> list[RawBatch]:
    """Read each batch (bounded memory per batch); unreadable files become a read error, not a crash."""
    hang_here("ingest.discovered")  # fault tests: the landing zone fails between discovery and read
    zone = open_landing(cfg.data.landing)
    listing = zone.scan()  # before reading: a file replaced during the read counts as changed
    batches = []
    for batch_id in batch_ids:
        signature = listing_signature(listing.get(batch_id, []))
        try:
            frame = read_batch(zone, batch_id, cfg.data)
            batches.append(RawBatch(batch_id, frame, listing=signature))
        except BatchReadError as error:
            batches.append(RawBatch(batch_id, None, error, listing=signature))
    return batches
