"""Daily: online LoRA (peft) with validation gating; an accepted adapter becomes a new version.

Run: `evergreen run daily-lora` (or the `daily-lora` deployment, `0 4 * * *`).
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
    discarded_update,
    load_champion,
    promote_or_reject,
    register_challenger,
    registration_for,
    select_metrics,
)
from tasks.train_lora import train_lora_gated
from tasks.validate import validate_batches

CADENCE = "daily-lora"


@flow(name=CADENCE, description="Online LoRA adapter, kept only if it passes the gate's rule.")
def daily_lora(
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
    # 2. validate, and remember what was accepted (kept even if the adapter is discarded)
    data = validate_batches(cfg, CADENCE, raw, memory, recheck=params.force)
    if data.empty:
        return conclude(cfg, all_quarantined(cfg, CADENCE, data))
    memory = commit_memory(cfg, memory, data.accepted())
    with challenger_workspace(cfg, CADENCE, data.batch_ids) as staging:
        # 3. train challenger (screened on the select rows: a discarded adapter is restored)
        challenger, check = time_limited(train_lora_gated, cfg.daily.train)(
            cfg, champion, data, memory
        )
        if challenger is None:
            return conclude(cfg, discarded_update(CADENCE, champion, data, check))
        # 4. evaluate against champion
        evaluation = evaluate_against_champion(cfg, champion, challenger, memory)
        # 5. promote or reject
        reg = registration_for(CADENCE, "lora", evaluation, champion, data, select_metrics(check))
        version = register_challenger(cfg, reg, staging)
        outcome = promote_or_reject(cfg, reg, version)
    return conclude(cfg, outcome, forced=params.force)


if __name__ == "__main__":
    daily_lora()
