"""Monthly: full fine-tune + online EWC on the month's batches.

Run: `evergreen run monthly-finetune` (or the `monthly-finetune` deployment, `0 2 1 * *`).
"""

from __future__ import annotations

from prefect import flow

from flows.common import all_quarantined, begin, nothing_to_do, require_champion
from tasks.common import FlowParams
from tasks.evaluate import evaluate_against_champion
from tasks.ingest import discover_batches, read_batches
from tasks.promote import (
    challenger_workspace,
    load_champion,
    promote_or_reject,
    register_challenger,
)
from tasks.train import train_finetune_ewc
from tasks.validate import record_drift, validate_batches

CADENCE = "monthly-finetune"


@flow(name=CADENCE, description="Full fine-tune with online EWC (decayed Fisher).")
def monthly_finetune(params: FlowParams = FlowParams()) -> dict:  # noqa: B008 - Prefect form
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
        # 3. train challenger
        challenger = train_finetune_ewc(cfg, champion, data)
        # 4. evaluate against champion
        decision = evaluate_against_champion(
            cfg, champion, challenger, data.holdout, champion.retention
        )
        # 5. promote or reject
        version = register_challenger(
            cfg, CADENCE, "finetune+ewc", challenger, champion, data, decision, staging, drift
        )
        outcome = promote_or_reject(cfg, CADENCE, version, champion, decision, data)
        outcome.metrics.update(drift)
        return outcome.to_dict()


if __name__ == "__main__":
    monthly_finetune()
