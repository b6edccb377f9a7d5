"""Monthly: full fine-tune + online EWC on the month's batches.

Run: `evergreen run monthly-finetune` (or the `monthly-finetune` deployment, `0 2 1 * *`).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import all_quarantined, begin, nothing_to_do, require_champion, selection
from flows.params import BATCH_IDS, CONFIG_PATH, FORCE, MAX_BATCHES, OVERRIDES, UNTIL, FlowParams
from tasks.evaluate import evaluate_against_champion
from tasks.ingest import discover_batches, read_batches
from tasks.limits import time_limited
from tasks.memory import commit_memory, load_memory
from tasks.outcome import conclude
from tasks.promote import (
    challenger_workspace,
    load_champion,
    promote_or_reject,
    register_challenger,
    registration_for,
)
from tasks.train_ewc import train_finetune_ewc
from tasks.validate import validate_batches

CADENCE = "monthly-finetune"


@flow(name=CADENCE, description="Full fine-tune with online EWC (decayed Fisher).")
def monthly_finetune(
    batch_ids: list[str] | None = BATCH_IDS,
    force: bool = FORCE,
    until: str | None = UNTIL,
    max_batches: int | None = MAX_BATCHES,
    config_path: str | None = CONFIG_PATH,
    overrides: list[str] = OVERRIDES,
) -> dict[str, Any]:
    params = FlowParams(**locals())
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
    # 2. validate, and remember what was accepted (kept even if the challenger is rejected)
    data = validate_batches(cfg, CADENCE, raw, memory, recheck=params.force)
    if data.empty:
        return conclude(cfg, all_quarantined(cfg, CADENCE, data))
    memory = commit_memory(cfg, memory, data.accepted())
    with challenger_workspace(cfg, CADENCE, data.batch_ids) as staging:
        # 3. train challenger
        challenger, metrics = time_limited(train_finetune_ewc, cfg.monthly.train)(
            cfg, champion, data, memory
        )
        # 4. evaluate against champion
        evaluation = evaluate_against_champion(cfg, champion, challenger, memory)
        # 5. promote or reject
        reg = registration_for(CADENCE, "finetune+ewc", evaluation, champion, data, metrics)
        version = register_challenger(cfg, reg, staging)
        outcome = promote_or_reject(cfg, reg, version)
    return conclude(cfg, outcome, forced=params.force)


if __name__ == "__main__":
    monthly_finetune()
