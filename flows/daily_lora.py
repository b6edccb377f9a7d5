"""Daily: online LoRA (peft) with validation gating; an accepted adapter becomes a new version.

Run: `evergreen run daily-lora` (or the `daily-lora` deployment, `0 4 * * *`).
"""

from __future__ import annotations

from prefect import flow

from flows.common import all_quarantined, begin, nothing_to_do, require_champion
from tasks.common import FlowParams
from tasks.evaluate import evaluate_against_champion
from tasks.ingest import discover_batches, read_batches
from tasks.promote import (
    FlowOutcome,
    challenger_workspace,
    load_champion,
    promote_or_reject,
    record_outcome,
    register_challenger,
)
from tasks.train import train_lora_gated
from tasks.validate import record_drift, validate_batches

CADENCE = "daily-lora"


@flow(name=CADENCE, description="Online LoRA adapter, kept only if validation does not regress.")
def daily_lora(params: FlowParams = FlowParams()) -> dict:  # noqa: B008 - Prefect form
    cfg = begin(params)
    # 1. ingest
    batch_ids = discover_batches(cfg, CADENCE, params)
    if not batch_ids:
        return nothing_to_do(CADENCE)
    raw = read_batches(cfg, batch_ids)
    # 2. validate
    data = validate_batches(cfg, CADENCE, raw)
    if data.empty:
        return all_quarantined(cfg, CADENCE, data.quarantined)
    champion = require_champion(load_champion(cfg), CADENCE)
    drift = record_drift(cfg, champion.retention, data)
    with challenger_workspace(cfg, CADENCE, data.batch_ids) as staging:
        # 3. train challenger (the adapter is restored exactly if validation regresses)
        challenger, lora_gate = train_lora_gated(cfg, champion, data)
        if challenger is None:
            outcome = FlowOutcome(
                cadence=CADENCE,
                decision="rejected",
                batch_ids=data.batch_ids,
                champion=champion.version,
                quarantined=data.quarantined,
                reasons=[
                    f"LoRA update regressed validation accuracy "
                    f"({lora_gate.score_before:.4f} → {lora_gate.score_after:.4f}); "
                    "adapter restored, no version registered"
                ],
                metrics={
                    "lora.before": lora_gate.score_before,
                    "lora.after": lora_gate.score_after,
                },
            )
            record_outcome(cfg, outcome)
            return outcome.to_dict()
        # 4. evaluate against champion
        decision = evaluate_against_champion(
            cfg, champion, challenger, data.holdout, champion.retention
        )
        # 5. promote or reject
        version = register_challenger(
            cfg, CADENCE, "lora", challenger, champion, data, decision, staging, drift
        )
        outcome = promote_or_reject(cfg, CADENCE, version, champion, decision, data)
        outcome.metrics.update(drift)
        return outcome.to_dict()


if __name__ == "__main__":
    daily_lora()
