"""Which batches a cadence run takes — one rule, used by the flows and by the CLI's no-op check.

`choose_batches` is the whole selection rule (the ledger says what is done; the landing zone what
has arrived; `batch_ids`, `until`, `max_batches` and `force` narrow or widen it). The ingest task
calls it inside the flow run; `evergreen run` calls it *before* starting a flow run, and when a
batch-consuming cadence has nothing to take it prints the same "skipped" outcome the flow would
return and starts no flow run (no Prefect server, no torch, peft, GX or MLflow model code):
a no-op run costs the ledger look-up only. The ledger is neither read differently nor written —
a skipped flow run records no ledger entry either — so the semantics are the flow's own; what the
fast path does not leave behind is a Prefect flow run with its decision artifact.
`--force`, explicit `--batch` ids and deployments (scheduled runs) always start the flow.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from evergreen.config import EvergreenConfig
from evergreen.errors import UsageError

NOTHING_PENDING = "no pending batches"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchSelection:
    """Which batches a run takes: exactly `batch_ids`, or every pending one (optionally up to
    `until`, at most `max_batches`); `force` also takes batches already processed."""

    batch_ids: tuple[str, ...] | None = None
    until: str | None = None
    max_batches: int | None = None
    force: bool = False


def choose_batches(cfg: EvergreenConfig, cadence: str, selection: BatchSelection) -> list[str]:
    """Batches `cadence` still has to process, in batch_id order (the ledger says which, and a
    quarantined batch whose files changed since is taken again), among those that have fully
    arrived (`data_plane.arrival`: marker, manifest or quiescence).
    A batch without a marker that is still inside its quiescence window is waited for once
    (at most `data.arrival_quiescence_seconds`), so a run started right after a plain copy takes
    it instead of skipping it; one that keeps changing stays pending.

    Raises:
        UsageError: a requested batch id is not in the landing zone or has not fully arrived.
    """
    from data_plane.arrival import batch_arrivals
    from data_plane.landing import open_landing
    from tasks import ledger

    zone = open_landing(cfg.data.landing)
    listing = zone.scan()
    done = set() if selection.force else ledger.processed(cfg, cadence, listing)
    window = cfg.data.arrival_quiescence_seconds
    arrivals = batch_arrivals(zone, done, quiescence_seconds=window, listing=listing)
    settling = [a.settles_in for a in arrivals if a.settles_in is not None]
    if settling:  # just landed without a marker: wait (at most one window) rather than skip it
        wait = max(settling) + 0.5
        log.info("waiting %.0fs for %d batch(es) without a marker to settle", wait, len(settling))
        time.sleep(wait)
        arrivals = batch_arrivals(zone, done, quiescence_seconds=window)
    chosen = [a.batch_id for a in arrivals if a.arrived]
    if selection.batch_ids:
        _check_requested(cfg, selection.batch_ids, {a.batch_id: a for a in arrivals}, done)
        chosen = [b for b in chosen if b in set(selection.batch_ids)]
    if selection.until:
        chosen = [b for b in chosen if b <= selection.until]
    if selection.max_batches:
        chosen = chosen[: selection.max_batches]
    return chosen


def _check_requested(
    cfg: EvergreenConfig, batch_ids: tuple[str, ...], arrivals: dict[str, Any], done: set[str]
) -> None:
    """Raise UsageError naming every requested batch that is absent or has not fully arrived
    (an already-processed one is fine: an unforced rerun of it is a no-op)."""
    problems = [
        f"{b}: {arrivals[b].reason}" if b in arrivals else f"{b}: not in the landing zone"
        for b in sorted(batch_ids)
        if (b in arrivals and not arrivals[b].arrived) or (b not in arrivals and b not in done)
    ]
    if problems:
        raise UsageError(
            f"requested batches cannot be read from {cfg.data.landing}: " + "; ".join(problems)
        )


def skipped_outcome(cadence: str) -> dict[str, Any]:
    """What a flow run with nothing pending returns (`FlowOutcome(...).to_dict()`, prefect-free)."""
    return {
        "cadence": cadence,
        "decision": "skipped",
        "batch_ids": [],
        "version": None,
        "champion": None,
        "reasons": [NOTHING_PENDING],
        "metrics": {},
        "quarantined": {},
    }


def nothing_pending(cfg: EvergreenConfig, cadence: str, params: dict[str, Any]) -> bool:
    """True when a run of batch-consuming `cadence` with these CLI parameters would take no
    batch; False whenever the flow must start (forced).

    Raises:
        UsageError: a requested batch id is not in the landing zone (or has not fully arrived),
            before a flow run is started for it.
    """
    batch_ids = tuple(params.get("batch_ids") or ())
    if params.get("force") and not batch_ids:
        return False
    selection = BatchSelection(
        batch_ids=batch_ids,
        until=params.get("until"),
        max_batches=params.get("max_batches"),
        force=bool(params.get("force")),
    )
    with _quiet("model_registry.ledger"):  # "changed since quarantined": the flow runs, says it
        chosen = choose_batches(cfg, cadence, selection)
    return not chosen and not selection.force


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Errors only from `logger_name` inside the block: what the check finds pending, the flow
    run it starts reports again in its own logs (one line, not two, on the console)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
