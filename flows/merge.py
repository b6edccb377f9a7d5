"""On demand: Fisher-weighted merge of chosen versions, gated like any other challenger.

Run: `evergreen run merge --set ...` or from the UI with `versions: ["3", "5"]`.
"""

from __future__ import annotations

from prefect import flow
from pydantic import Field

from flows.common import begin, require_champion
from tasks.common import FlowParams
from tasks.evaluate import evaluate_against_champion
from tasks.merge import fisher_merge_models, load_versions, retention_slices
from tasks.promote import (
    challenger_workspace,
    load_champion,
    promote_or_reject,
    register_challenger,
)
from tasks.validate import PreparedData

CADENCE = "merge"


class MergeParams(FlowParams):
    versions: list[str] = Field(
        ..., min_length=2, description="Model versions to merge, e.g. [3, 5]."
    )
    eps: float = Field(1e-8, gt=0, description="Floor of Σ F (parameters no model cares about).")


@flow(name=CADENCE, description="Fisher-weighted merge of chosen versions.")
def merge(params: MergeParams) -> dict:
    cfg = begin(params)
    # 1. ingest: the versions to merge and the champion's retention set
    champion = require_champion(load_champion(cfg), CADENCE)
    parents = load_versions(cfg, [str(v) for v in params.versions])
    with challenger_workspace(cfg, CADENCE, []) as staging:
        # 2. validate: parents share an architecture (checked while loading)
        # 3. train challenger: no training, a merge
        challenger, distances = fisher_merge_models(cfg, parents, champion, params.eps)
        # 4. evaluate against champion on the latest batch and the whole retention set
        latest, retention = retention_slices(champion.retention)
        decision = evaluate_against_champion(cfg, champion, challenger, latest, retention)
        # 5. promote or reject
        data = PreparedData(batch_ids=[], train=latest.iloc[:0], holdout=latest, data_hash="merge")
        version = register_challenger(
            cfg,
            CADENCE,
            "fisher-merge:" + "+".join(params.versions),
            challenger,
            champion,
            data,
            decision,
            staging,
        )
        outcome = promote_or_reject(cfg, CADENCE, version, champion, decision, data)
        outcome.metrics.update(distances)
        return outcome.to_dict()
