"""First run: plain training of the first champion on the landed batches.

Run: `evergreen run bootstrap` (manual deployment `bootstrap`).
"""

from __future__ import annotations

from prefect import flow

from flows.common import all_quarantined, begin, nothing_to_do
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
from tasks.train import train_first_model
from tasks.validate import validate_batches

CADENCE = "bootstrap"
# Batches the first champion learned from are not new to the update cadences.
CONSUMES_FOR = ("monthly-finetune", "weekly-replay", "daily-lora", "stream-monitor")


@flow(name=CADENCE, description="Train and register the first champion.")
def bootstrap(params: FlowParams = FlowParams()) -> dict:  # noqa: B008 - Prefect form
    cfg = begin(params)
    current = load_champion(cfg)
    if current is not None and not params.force:
        return FlowOutcome(
            cadence=CADENCE,
            decision="skipped",
            reasons=["a champion exists; force=true to retrain"],
        ).to_dict()
    # 1. ingest
    batch_ids = discover_batches(cfg, CADENCE, params)
    if not batch_ids:
        return nothing_to_do(CADENCE)
    raw = read_batches(cfg, batch_ids)
    memory = load_memory(cfg)
    # 2. validate, and remember what was accepted
    data = validate_batches(cfg, CADENCE, raw, memory)
    if data.empty:
        return all_quarantined(cfg, CADENCE, data.quarantined)
    memory = commit_memory(cfg, memory, data.accepted())
    with challenger_workspace(cfg, CADENCE, data.batch_ids) as staging:
        # 3. train the first model
        challenger = train_first_model(cfg, data, memory)
        # 4. evaluate (no champion: the accuracy floor of the gate policy applies)
        evaluation = evaluate_against_champion(cfg, None, challenger, memory)
        # 5. promote or reject
        reg = registration_for(CADENCE, "plain", evaluation, current, data)
        version = register_challenger(cfg, reg, staging)
        outcome = promote_or_reject(cfg, reg, version)
    if outcome.decision == "promoted":
        ledger = Ledger.from_config(cfg)
        for cadence in CONSUMES_FOR:
            for batch_id in data.batch_ids:
                ledger.record(
                    cadence,
                    batch_id,
                    "promoted",
                    details={"by": "bootstrap", "version": str(outcome.version)},
                )
    return outcome.to_dict()


if __name__ == "__main__":
    bootstrap()
