"""On demand: Fisher-weighted, linear, TIES or DARE merge of chosen versions, gated like any other
challenger.

Run: `evergreen run merge --versions 3 5 [--method linear|ties|dare|dare_ties] [--density D]
[--seed S]` or from the UI with `versions: ["3", "5"]`. TIES and DARE work on task vectors against
the versions' nearest common registered ancestor (`tasks.merge.common_ancestor`).
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow

from continual.task_merging import TASK_METHODS
from flows.common import begin, require_champion
from flows.params import (
    CONFIG_PATH,
    DENSITY,
    EPS,
    MERGE_METHOD,
    OVERRIDES,
    SEED,
    VERSIONS,
    MergeParams,
)
from tasks.evaluate import evaluate_against_champion
from tasks.memory import load_memory
from tasks.merge import find_ancestor, load_versions, merge_models, require_versions
from tasks.outcome import conclude
from tasks.promote import (
    challenger_workspace,
    load_champion,
    promote_or_reject,
    register_challenger,
    registration_for,
)

CADENCE = "merge"


@flow(name=CADENCE, description="Fisher-weighted, linear, TIES or DARE merge of chosen versions.")
def merge(
    versions: list[str] = VERSIONS,
    eps: float = EPS,
    method: Literal["fisher", "linear", "ties", "dare", "dare_ties"] = MERGE_METHOD,
    density: float | None = DENSITY,
    seed: int = SEED,
    config_path: str | None = CONFIG_PATH,
    overrides: list[str] = OVERRIDES,
) -> dict[str, Any]:
    params = MergeParams(**locals())
    cfg = begin(params)
    # 1. ingest: the versions to merge, the champion and the data memory's gate rows
    champion = require_champion(load_champion(cfg), CADENCE)
    names = [str(v) for v in params.versions]
    require_versions(cfg, names)
    parents = load_versions(cfg, names)
    ancestor = None
    if params.method in TASK_METHODS:  # their changes are measured from their common ancestor
        ancestor = load_versions(cfg, [find_ancestor(cfg, names)])[0]
    memory = load_memory(cfg)
    with challenger_workspace(cfg, CADENCE, []) as staging:
        # 2. validate: parents share an architecture (checked while loading)
        # 3. train challenger: no training, a merge weighted by each parent's own Fisher (or
        #    not), or TIES/DARE on the parents' changes to their common ancestor
        challenger, distances = merge_models(
            cfg,
            parents,
            champion,
            memory,
            params.eps,
            params.method,
            ancestor=ancestor,
            density=params.density,
            seed=params.seed,
        )
        # 4. evaluate against champion
        evaluation = evaluate_against_champion(cfg, champion, challenger, memory)
        # 5. promote or reject
        label = f"{params.method}-merge:" + "+".join(params.versions)
        reg = registration_for(CADENCE, label, evaluation, champion, None, distances)
        version = register_challenger(cfg, reg, staging)
        outcome = promote_or_reject(cfg, reg, version)
    return conclude(cfg, outcome)
