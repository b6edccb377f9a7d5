"""Evaluate against champion: paired per-example scores on the gate rows of the data memory.

"New" rows are the gate rows of every batch the champion has not learned (this run's, and those
of earlier runs whose challengers were rejected: the evidence accumulates until an update
passes); "retention" rows are the gate rows of the batches it has learned, each batch carrying
its fixed reference accuracy for the cumulative-forgetting budget.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from continual.gating import GateDecision, GatePolicy, decide
from continual.training import correct_mask
from evergreen.config import EvergreenConfig
from tasks.common import frame_to_tensors
from tasks.memory import BATCH_COLUMN, DataMemory
from tasks.state import ModelState


def gate_policy(cfg: EvergreenConfig) -> GatePolicy:
    g = cfg.gate
    return GatePolicy(
        new_data_tolerance=g.new_data_tolerance,
        retention_tolerance=g.retention_tolerance,
        confidence=g.confidence,
        new_data_rule=g.new_data_rule,
        forgetting_budget=g.forgetting_budget,
        min_examples=g.min_examples,
        min_accuracy=g.min_accuracy,
        n_bootstrap=g.n_bootstrap,
    )


def split_by_learned(
    memory: DataMemory, learned: frozenset[str], role: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows of batches not in `learned`, rows of batches in `learned`) of one held-out role.

    With nothing new (a merge or consolidation of the same data), the latest learned batch
    stands in as "new" so the gate still has a new-data view.
    """
    unlearned = frozenset(memory.batches) - learned
    new = memory.rows(role, unlearned)
    old = memory.rows(role, learned)
    if new.empty and not old.empty:
        latest = max(old[BATCH_COLUMN].astype(str))
        new = old[old[BATCH_COLUMN].astype(str) == latest]
    return new, old


@dataclass(frozen=True)
class Evaluation:
    """The gate's decision and the challenger it judged, with its references filled in."""

    decision: GateDecision
    challenger: ModelState
    rows: pd.DataFrame  # the new-data gate rows it was scored on


def _correct(state: ModelState | None, frame: pd.DataFrame, label: str) -> np.ndarray | None:
    if state is None or frame.empty:
        return None
    X, y = frame_to_tensors(frame, state.spec, label)
    return correct_mask(state.model, X, y)


def _references(
    champion: ModelState | None, new: pd.DataFrame, correct: np.ndarray | None
) -> dict[str, float]:
    """The champion's references plus, for each batch first learned now, the challenger's
    accuracy on it: fixed from then on (if this challenger becomes champion)."""
    references = dict(champion.references) if champion else {}
    if correct is None:
        return references
    per_batch = pd.Series(correct, index=new.index).groupby(new[BATCH_COLUMN].astype(str)).mean()
    for batch_id, accuracy in per_batch.items():
        references.setdefault(str(batch_id), float(accuracy))
    return references


@task(cache_policy=NO_CACHE, timeout_seconds=1800)
def evaluate_against_champion(
    cfg: EvergreenConfig,
    champion: ModelState | None,
    challenger: ModelState,
    memory: DataMemory,
) -> Evaluation:
    """The gate's decision for `challenger` vs `champion` (pure function in continual.gating)."""
    label = cfg.data.label
    learned = champion.learned if champion else frozenset()
    new, retention = split_by_learned(memory, learned, "gate")
    if new.empty:
        raise ValueError("no gate rows to evaluate on: raise data.gate_fraction or batch sizes")
    challenger_new = _correct(challenger, new, label)
    decision = decide(
        challenger_new_correct=challenger_new,
        champion_new_correct=_correct(champion, new, label),
        challenger_retention_correct=_correct(challenger, retention, label),
        champion_retention_correct=_correct(champion, retention, label),
        retention_groups=None if retention.empty else retention[BATCH_COLUMN].astype(str).tolist(),
        references=champion.references if champion else None,
        policy=gate_policy(cfg),
    )
    logger = get_run_logger()
    for reason in decision.reasons:
        logger.info("gate: %s", reason)
    references = _references(champion, new, challenger_new)
    return Evaluation(decision, replace(challenger, references=references), new)
