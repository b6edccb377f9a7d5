"""First run: plain training of the first champion on the landed batches.

Run: `evergreen run bootstrap` (manual deployment `bootstrap`).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import all_quarantined, begin, nothing_to_do, selection
from flows.params import BATCH_IDS, CONFIG_PATH, FORCE, MAX_BATCHES, OVERRIDES, UNTIL, FlowParams
from tasks.evaluate import evaluate_against_champion
from tasks.ingest import discover_batches, read_batches
from tasks.ledger import record_consumed
from tasks.limits import time_limited
from tasks.memory import commit_memory, load_memory
from tasks.outcome import FlowOutcome, conclude
from tasks.promote import (
    challenger_workspace,
    load_champion,
    promote_or_reject,
    register_challenger,
    registration_for,
)
from tasks.train_bootstrap import train_first_model
from tasks.validate import validate_batches

CADENCE = "bootstrap"


@flow(name=CADENCE, description="Train and register the first champion.")
def bootstrap(
    batch_ids: list[str] | None = BATCH_IDS,
    force: bool = FORCE,
    until: str | None = UNTIL,
    max_batches: int | None = MAX_BATCHES,
    config_path: str | None = CONFIG_PATH,
    overrides: list[str] = OVERRIDES,
) -> dict[str, Any]:
    params = FlowParams(**locals())
    cfg = begin(params)
    current = load_champion(cfg)
    if current is not None and not params.force:
        reason = "a champion exists; force=true to retrain"
        return conclude(cfg, FlowOutcome(CADENCE, "skipped", reasons=[reason]))
    # 1. ingest
    batch_ids = discover_batches(cfg, CADENCE, selection(params))
    if not batch_ids:
        return conclude(cfg, nothing_to_do(CADENCE))
    raw = read_batches(cfg, batch_ids)
    memory = load_memory(cfg)
    # 2. validate, and remember what was accepted
    data = validate_batches(cfg, CADENCE, raw, memory, recheck=params.force)
    if data.empty:
        return conclude(cfg, all_quarantined(cfg, CADENCE, data))
    memory = commit_memory(cfg, memory, data.accepted())
    with challenger_workspace(cfg, CADENCE, data.batch_ids) as staging:
        # 3. train the first model
        challenger = time_limited(train_first_model, cfg.bootstrap.train)(cfg, data, memory)
        # 4. evaluate (no champion: the accuracy floor of the gate policy applies)
        evaluation = evaluate_against_champion(cfg, None, challenger, memory)
        # 5. promote or reject
        reg = registration_for(CADENCE, "plain", evaluation, current, data)
        version = register_challenger(cfg, reg, staging)
        outcome = promote_or_reject(cfg, reg, version)
    if outcome.decision == "promoted":  # its batches are not new to the update cadences
        record_consumed(cfg, data.batch_ids, str(outcome.version))
    return conclude(cfg, outcome, forced=params.force)


if __name__ == "__main__":
    bootstrap()
