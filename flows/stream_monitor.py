"""Real time: streaming EMA + Page-Hinkley drift detection over micro-batches.

Drift emits `evergreen.drift.detected`; prefect.yaml triggers the `weekly-replay` deployment on it.
Run: `evergreen run stream-monitor` (deployment `stream-monitor`, every 15 minutes).
"""

from __future__ import annotations

from prefect import flow
from pydantic import Field

from flows.common import all_quarantined, begin, nothing_to_do, require_champion
from model_registry.ledger import Ledger
from tasks.common import FlowParams
from tasks.evaluate import evaluate_against_champion
from tasks.ingest import discover_batches, read_batches
from tasks.memory import commit_memory, load_memory
from tasks.promote import (
    FlowOutcome,
    challenger_workspace,
    load_champion,
    promote_or_reject,
    register_challenger,
    registration_for,
)
from tasks.stream import monitor_stream
from tasks.validate import validate_batches

CADENCE = "stream-monitor"


class StreamParams(FlowParams):
    promote_ema: bool = Field(
        False, description="Also gate the EMA weights as a challenger (default: monitor only)."
    )


@flow(name=CADENCE, description="Page-Hinkley drift detection on the champion's loss stream.")
def stream_monitor(params: StreamParams = StreamParams()) -> dict:  # noqa: B008 - Prefect form
    cfg = begin(params)
    # 1. ingest
    batch_ids = discover_batches(cfg, CADENCE, params)
    if not batch_ids:
        return nothing_to_do(CADENCE)
    raw = read_batches(cfg, batch_ids)
    memory = load_memory(cfg)
    # 2. validate
    data = validate_batches(cfg, CADENCE, raw, memory)
    if data.empty:
        return all_quarantined(cfg, CADENCE, data.quarantined)
    champion = require_champion(load_champion(cfg), CADENCE)
    # 3. stream the samples through the champion, the detector and the EMA teacher
    frames = [data.frames[b] for b in data.batch_ids]
    report = monitor_stream(cfg, champion, frames, data.batch_ids, memory)
    metrics = {
        "stream.samples": report.samples,
        "stream.mean_loss": report.mean_loss,
        "stream.threshold": report.threshold,
        "stream.alarms": len(report.drift_at),
    }
    if not params.promote_ema:
        ledger = Ledger.from_config(cfg)
        for batch_id in data.batch_ids:
            ledger.record(CADENCE, batch_id, "skipped", details={"drift": str(report.drift_at)})
        decision = "drift" if report.drift_at else "skipped"
        return FlowOutcome(
            cadence=CADENCE,
            decision=decision,
            batch_ids=data.batch_ids,
            champion=champion.version,
            metrics=metrics,
            reasons=[f"drift at {report.drift_at[:3]}" if report.drift_at else "no drift"],
        ).to_dict()
    memory = commit_memory(cfg, memory, data.accepted())
    with challenger_workspace(cfg, CADENCE, data.batch_ids) as staging:
        # 4. evaluate the EMA weights against the champion
        evaluation = evaluate_against_champion(cfg, champion, report.ema, memory)
        # 5. promote or reject
        reg = registration_for(CADENCE, "stream-ema", evaluation, champion, data, metrics)
        version = register_challenger(cfg, reg, staging)
        return promote_or_reject(cfg, reg, version).to_dict()
