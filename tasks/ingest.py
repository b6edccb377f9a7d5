"""Ingest: find the batches a cadence has not processed yet and read them from the landing zone."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from prefect import get_run_logger, task
from prefect.tasks import exponential_backoff

from data_plane.arrival import Arrival, batch_arrivals
from data_plane.landing import BatchReadError, open_landing, read_batch
from evergreen.config import EvergreenConfig
from tasks import ledger


@dataclass(frozen=True)
class BatchSelection:
    """Which batches a run takes: exactly `batch_ids`, or every pending one (optionally up to
    `until`, at most `max_batches`); `force` also takes batches already processed."""

    batch_ids: tuple[str, ...] | None = None
    until: str | None = None
    max_batches: int | None = None
    force: bool = False


@dataclass
class RawBatch:
    """One batch as read from the landing zone: a frame, or the reason it could not be read."""

    batch_id: str
    frame: pd.DataFrame | None
    read_error: BatchReadError | None = None


@task(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), timeout_seconds=300)
def discover_batches(cfg: EvergreenConfig, cadence: str, selection: BatchSelection) -> list[str]:
    """Batches this cadence still has to process, in batch_id order (the ledger says which)."""
    zone = open_landing(cfg.data.landing)
    done = set() if selection.force else ledger.processed(cfg, cadence)
    # the data plane's rule: not done, and fully arrived (marker, manifest or quiescence)
    arrivals = batch_arrivals(zone, done, quiescence_seconds=cfg.data.arrival_quiescence_seconds)
    chosen = [a.batch_id for a in arrivals if a.arrived]
    if selection.batch_ids:
        chosen = _requested(cfg, selection.batch_ids, chosen, arrivals, done)
    if selection.until:
        chosen = [b for b in chosen if b <= selection.until]
    if selection.max_batches:
        chosen = chosen[: selection.max_batches]
    get_run_logger().info("%s: %d batch(es) to process: %s", cadence, len(chosen), chosen)
    return chosen


def _requested(cfg, batch_ids, chosen: list[str], arrivals: list[Arrival], done) -> list[str]:
    """The requested batches among `chosen`.

    Raises:
        ValueError: a requested batch is not in the landing zone or has not fully arrived.
    """
    why = {a.batch_id: a.reason for a in arrivals if not a.arrived}
    known = {a.batch_id for a in arrivals} | set(done)
    problems = [
        f"{b}: {why[b]}" if b in why else f"{b}: not in the landing zone"
        for b in sorted(batch_ids)
        if b in why or b not in known
    ]
    if problems:
        raise ValueError(
            f"requested batches cannot be read from {cfg.data.landing}: " + "; ".join(problems)
        )
    requested = set(batch_ids)
    return [b for b in chosen if b in requested]


@task(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), timeout_seconds=900)
def read_batches(cfg: EvergreenConfig, batch_ids: list[str]) -> list[RawBatch]:
    """Read each batch (bounded memory per batch); unreadable files become a read error, not a crash."""
    zone = open_landing(cfg.data.landing)
    batches = []
    for batch_id in batch_ids:
        try:
            batches.append(RawBatch(batch_id, read_batch(zone, batch_id, cfg.data)))
        except BatchReadError as error:
            batches.append(RawBatch(batch_id, None, error))
    return batches
