"""Evaluate against champion: paired per-example scores on new data and on the retention set."""

from __future__ import annotations

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from continual.gating import GateDecision, GatePolicy, decide
from continual.training import correct_mask
from evergreen.config import EvergreenConfig
from tasks.common import frame_to_tensors
from tasks.state import ModelState


def gate_policy(cfg: EvergreenConfig) -> GatePolicy:
    g = cfg.gate
    return GatePolicy(
        new_data_tolerance=g.new_data_tolerance,
        retention_tolerance=g.retention_tolerance,
        confidence=g.confidence,
        min_accuracy=g.min_accuracy,
        n_bootstrap=g.n_bootstrap,
    )


def _correct(state: ModelState | None, frame: pd.DataFrame | None, label: str):
    if state is None or frame is None or frame.empty:
        return None
    X, y = frame_to_tensors(frame, state.spec, label)
    return correct_mask(state.model, X, y)


@task(cache_policy=NO_CACHE, timeout_seconds=1800)
def evaluate_against_champion(
    cfg: EvergreenConfig,
    champion: ModelState | None,
    challenger: ModelState,
    new_rows: pd.DataFrame,
    retention: pd.DataFrame | None,
) -> GateDecision:
    """The gate's decision for `challenger` vs `champion` (pure function in continual.gating).

    `new_rows` is the new batches' held-out split; `retention` is the champion's retention set
    (held-out rows of every earlier batch), which measures forgetting.
    """
    label = cfg.data.label
    decision = decide(
        challenger_new_correct=_correct(challenger, new_rows, label),
        champion_new_correct=_correct(champion, new_rows, label),
        challenger_retention_correct=_correct(challenger, retention, label),
        champion_retention_correct=_correct(champion, retention, label),
        policy=gate_policy(cfg),
    )
    logger = get_run_logger()
    for reason in decision.reasons:
        logger.info("gate: %s", reason)
    return decision
