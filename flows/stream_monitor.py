"""Real time: streaming EMA + Page-Hinkley drift detection over micro-batches.

Drift emits `evergreen.drift.detected`; prefect.yaml triggers the `weekly-replay` deployment on it.
Run: `evergreen run stream-monitor` (deployment `stream-monitor`, every 15 minutes).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import all_quarantined, begin, nothing_to_do, require_champion, selection
from flows.params import (
    BATCH_IDS,
    CONFIG_PATH,
    FORCE,
    MAX_BATCHES,
    OVERRIDES,
    PROMOTE_EMA,
    UNTIL,
    StreamParams,
)
from tasks.evaluate import evaluate_against_champion
from tasks.ingest import discover_batches, read_batches
from tasks.memory import commit_memory, load_memory
from tasks.outcome import FlowOutcome, conclude
from tasks.promote import (
    challenger_workspace,
    load_champion,
    promote_or_reject,
    register_challenger,
    registration_for,
)
from tasks.stream import monitor_stream
from tasks.validate import validate_batches

CADENCE = "stream-monitor"


@flow(name=CADENCE, description="Page-Hinkley drift detection on the champion's loss stream.")
def stream_monitor(
    batch_ids: list[str] | None = BATCH_IDS,
    force: bool = FORCE,
    until: str | None = UNTIL,
    max_batches: int | None = MAX_BATCHES,
    promote_ema: bool = PROMOTE_EMA,
    config_path: str | None = CONFIG_PATH,
    overrides: list[str] = OVERRIDES,
) -> dict[str, Any]:
    params = StreamParams(**locals())
    cfg = begin(params)
    # 1. ingest
    batch_ids = discover_batches(cfg, CADENCE, selection(params))
    if not batch_ids:
        return conclude(cfg, nothing_to_do(CADENCE))
    # a config that left the champion's classes or inputs is refused before any batch is
    # validated under it (it would quarantine them all and never say why)
    champion = require_champion(load_champion(cfg), CADENCE, cfg)
    raw = read_batches(cfg, batch_ids)
    memory = load_memory(cfg)
    # 2. validate
    data = validate_batches(cfg, CADENCE, raw, memory, recheck=params.force)
    if data.empty:
        return conclude(cfg, all_quarantined(cfg, CADENCE, data))
    # 3. stream the samples through the champion, the detector and the EMA teacher
    frames = [data.frames[b] for b in data.batch_ids]
    report = monitor_stream(cfg, champion, frames, data.batch_ids, memory)
    metrics = {
        "stream.samples": report.samples,
        "stream.mean_loss": report.mean_loss,
        "stream.threshold": report.threshold,
        "stream.alarms": len(report.drift_at),
    }
    if not params.promote_ema:  # monitored only: recorded as seen ("skipped" in the ledger)
        monitored = FlowOutcome(
            cadence=CADENCE,
            decision="drift" if report.drift_at else "skipped",
            batch_ids=data.batch_ids,
            champion=champion.version,
            metrics=metrics,
            reasons=[f"drift at {report.drift_at[:3]}" if report.drift_at else "no drift"],
            quarantined=data.quarantined,
            verdict_keys=data.verdict_keys,
        )
        return conclude(cfg, monitored, forced=params.force)
    memory = commit_memory(cfg, memory, data.accepted())
    with challenger_workspace(cfg, CADENCE, data.batch_ids) as staging:
        # 4. evaluate the EMA weights against the champion
        evaluation = evaluate_against_champion(cfg, champion, report.ema, memory)
        # 5. promote or reject
        reg = registration_for(CADENCE, "stream-ema", evaluation, champion, data, metrics)
        version = register_challenger(cfg, reg, staging)
        outcome = promote_or_reject(cfg, reg, version)
    return conclude(cfg, outcome, forced=params.force)
