"""On demand: Fisher-weighted (or plain linear) merge of chosen versions, gated like any other
challenger.

Run: `evergreen run merge --versions 3 5 [--method linear]` or from the UI with
`versions: ["3", "5"]`.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow

from flows.common import begin, require_champion
from flows.params import CONFIG_PATH, EPS, MERGE_METHOD, OVERRIDES, VERSIONS, MergeParams
from tasks.evaluate import evaluate_against_champion
from tasks.memory import load_memory
from tasks.merge import load_versions, merge_models
from tasks.outcome import conclude
from tasks.promote import (
    challenger_workspace,
    load_champion,
    promote_or_reject,
    register_challenger,
    registration_for,
)

CADENCE = "merge"


@flow(name=CADENCE, description="Fisher-weighted or linear merge of chosen versions.")
def merge(
    versions: list[str] = VERSIONS,
    eps: float = EPS,
    method: Literal["fisher", "linear"] = MERGE_METHOD,
    config_path: str | None = CONFIG_PATH,
    overrides: list[str] = OVERRIDES,
) -> dict:
    params = MergeParams(**locals())
    cfg = begin(params)
    # 1. ingest: the versions to merge, the champion and the data memory's gate rows
    champion = require_champion(load_champion(cfg), CADENCE)
    parents = load_versions(cfg, [str(v) for v in params.versions])
    memory = load_memory(cfg)
    with challenger_workspace(cfg, CADENCE, []) as staging:
        # 2. validate: parents share an architecture (checked while loading)
        # 3. train challenger: no training, a merge weighted by each parent's own Fisher (or not)
        challenger, distances = merge_models(
            cfg, parents, champion, memory, params.eps, params.method
        )
        # 4. evaluate against champion
        evaluation = evaluate_against_champion(cfg, champion, challenger, memory)
        # 5. promote or reject
        label = f"{params.method}-merge:" + "+".join(params.versions)
        reg = registration_for(CADENCE, label, evaluation, champion, None, distances)
        version = register_challenger(cfg, reg, staging)
        outcome = promote_or_reject(cfg, reg, version)
    return conclude(cfg, outcome)
