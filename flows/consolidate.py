"""Periodic: EMA (or linear interpolation) over the champion lineage, gated like any challenger.

Run: `evergreen run consolidate` (or the `consolidate` deployment, `0 5 * * 0`).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import begin, require_champion
from flows.params import CONFIG_PATH, OVERRIDES, ConfigParams
from tasks.evaluate import evaluate_against_champion
from tasks.memory import load_memory
from tasks.merge import consolidate_lineage, lineage_versions, load_versions
from tasks.outcome import FlowOutcome, conclude
from tasks.promote import (
    challenger_workspace,
    load_champion,
    promote_or_reject,
    register_challenger,
    registration_for,
)

CADENCE = "consolidate"


@flow(name=CADENCE, description="Consolidate the champion lineage by EMA or interpolation.")
def consolidate(
    config_path: str | None = CONFIG_PATH,
    overrides: list[str] = OVERRIDES,
) -> dict[str, Any]:
    params = ConfigParams(**locals())
    cfg = begin(params)
    # 1. ingest: the recent champions
    champion = require_champion(load_champion(cfg), CADENCE)
    versions = lineage_versions(cfg, cfg.consolidate.lineage)
    if len(versions) < 2:
        reason = f"lineage has {len(versions)} champion(s); need at least 2"
        skipped = FlowOutcome(CADENCE, "skipped", champion=champion.version, reasons=[reason])
        return conclude(cfg, skipped)
    # 2. validate: same architecture (checked while loading)
    lineage = load_versions(cfg, versions)
    memory = load_memory(cfg)
    with challenger_workspace(cfg, CADENCE, []) as staging:
        # 3. train challenger: weight-space consolidation, no gradient steps
        challenger, distances = consolidate_lineage(cfg, lineage, champion)
        # 4. evaluate against champion
        evaluation = evaluate_against_champion(cfg, champion, challenger, memory)
        # 5. promote or reject
        method = f"{cfg.consolidate.mode}:" + "+".join(versions)
        reg = registration_for(CADENCE, method, evaluation, champion, None, distances)
        version = register_challenger(cfg, reg, staging)
        outcome = promote_or_reject(cfg, reg, version)
    return conclude(cfg, outcome)
