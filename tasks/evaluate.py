"""Evaluate against champion: paired per-example scores on the gate rows of the data memory.

"New" rows are the gate rows of every batch the champion has not learned (this run's, and those
of earlier runs whose challengers were rejected: the evidence accumulates until an update
passes); "retention" rows are the gate rows of the batches it has learned, each batch carrying
its fixed reference accuracy for the cumulative-forgetting budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from continual.causal_lm import beats_uniform, has_next_token
from continual.classification import ClassReport, class_report
from continual.gate_policy import GateDecision, GatePolicy, rebased_references
from continual.gating import decide
from continual.inference import predict_logits, row_scores
from continual.models import CAUSAL_LM, ModelSpec
from evergreen.config import EvergreenConfig
from evergreen.errors import ConfigError
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
        exchange_gain=g.exchange_gain,
        exchange_max_loss=g.exchange_max_loss,
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
    retention: pd.DataFrame = field(default_factory=pd.DataFrame)  # retention gate rows
    selection: pd.DataFrame = field(default_factory=pd.DataFrame)  # select rows of every batch
    class_reports: dict[str, ClassReport] = field(default_factory=dict)  # model → on all rows
    seconds: float = 0.0


@dataclass(frozen=True)
class Scored:
    """One model's predicted class indices on the new and retention gate rows."""

    new: np.ndarray | None
    retention: np.ndarray | None

    def correct(self, truth: Scored) -> tuple[np.ndarray | None, np.ndarray | None]:
        return _equal(self.new, truth.new), _equal(self.retention, truth.retention)

    def pooled(self) -> np.ndarray:
        return np.concatenate([p for p in (self.new, self.retention) if p is not None])


def _equal(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    return None if a is None or b is None else a == b


def _predicted(state: ModelState | None, frame: pd.DataFrame, label: str) -> np.ndarray | None:
    """Top class index per row (one forward pass serves the gate and the class report)."""
    if state is None or frame.empty:
        return None
    X = frame_to_tensors(frame, state.spec, label)[0]
    return predict_logits(state.model, X).argmax(dim=-1).numpy()


def _scored(state: ModelState, new: pd.DataFrame, retention: pd.DataFrame, label: str) -> Scored:
    return Scored(_predicted(state, new, label), _predicted(state, retention, label))


def _truth(spec: ModelSpec, frame: pd.DataFrame, label: str) -> np.ndarray | None:
    return None if frame.empty else frame_to_tensors(frame, spec, label)[1].numpy()


def _references(
    champion: ModelState | None,
    new: pd.DataFrame,
    correct: np.ndarray | None,
    decision: GateDecision,
) -> dict[str, float]:
    """The champion's references (re-based after an exchange: `rebased_references`) plus, for
    each batch first learned now, the challenger's accuracy on it: fixed from then on (if this
    challenger becomes champion)."""
    references = rebased_references(dict(champion.references), decision) if champion else {}
    if correct is None:
        return references
    per_batch = pd.Series(correct, index=new.index).groupby(new[BATCH_COLUMN].astype(str)).mean()
    for batch_id, accuracy in per_batch.items():
        references.setdefault(str(batch_id), float(accuracy))
    return references


def _lm_scores(
    state: ModelState | None, new: pd.DataFrame, retention: pd.DataFrame, label: str
) -> Scored:
    """A causal LM's per-row mean token log-likelihood on the new and retention gate rows."""

    def score(frame: pd.DataFrame) -> np.ndarray | None:
        if state is None or frame.empty:
            return None
        X, y = frame_to_tensors(frame, state.spec, label)
        return row_scores(state.model, X, y)

    return Scored(score(new), score(retention))


def _scorable(
    challenger: ModelState, new: pd.DataFrame, retention: pd.DataFrame, label: str
) -> tuple[pd.DataFrame, pd.DataFrame, str | None]:
    """A causal LM's gate rows that have a token to predict, and a reason naming those left out.

    A row of fewer than 2 tokens has no log-likelihood: it scores 0.0 for both models, a tie
    that carries no evidence but counts in the paired tests' n (narrowing their intervals and
    diluting the difference), and 0.0 nats is the best score a row can have (it raised a first
    champion's floor and the references of its batch). Classifiers keep every row (None).
    """
    if challenger.spec.family != CAUSAL_LM:
        return new, retention, None

    def keep(frame: pd.DataFrame) -> pd.DataFrame:
        if frame.empty:
            return frame
        ids = frame_to_tensors(frame, challenger.spec, label)[0]
        return frame[has_next_token(challenger.model, ids)]

    kept_new, kept_retention = keep(new), keep(retention)
    dropped = {"new": len(new) - len(kept_new), "retention": len(retention) - len(kept_retention)}
    if not any(dropped.values()):
        return new, retention, None
    counts = " and ".join(f"{n} {role}" for role, n in dropped.items() if n)
    reason = (
        f"left out {counts} gate row(s) of fewer than 2 tokens: a causal LM predicts no token of "
        "them, so they carry no evidence either way"
    )
    return kept_new, kept_retention, reason


def _paired_scores(
    cfg: EvergreenConfig,
    champion: ModelState | None,
    challenger: ModelState,
    new: pd.DataFrame,
    retention: pd.DataFrame,
) -> tuple[dict[str, tuple[np.ndarray | None, np.ndarray | None]], dict[str, ClassReport]]:
    """Per-row scores {model: (new, retention)} (higher is better) and class reports.

    Classifiers: correctness of the top class (and a class report); causal LMs: the mean token
    log-likelihood (`continual.inference.row_scores`), no class report.
    """
    label = cfg.data.label
    models = {"challenger": challenger, **({"champion": champion} if champion else {})}
    if challenger.spec.family == CAUSAL_LM:
        lm = {name: _lm_scores(state, new, retention, label) for name, state in models.items()}
        return {name: (s.new, s.retention) for name, s in lm.items()}, {}
    spec = challenger.spec
    truth = Scored(_truth(spec, new, label), _truth(spec, retention, label))
    scored = {name: _scored(state, new, retention, label) for name, state in models.items()}
    reports = {
        name: class_report(truth.pooled(), s.pooled(), list(spec.classes))
        for name, s in scored.items()
    }
    return {name: s.correct(truth) for name, s in scored.items()}, reports


@task(cache_policy=NO_CACHE, timeout_seconds=1800)
def evaluate_against_champion(
    cfg: EvergreenConfig,
    champion: ModelState | None,
    challenger: ModelState,
    memory: DataMemory,
) -> Evaluation:
    """The gate's decision for `challenger` vs `champion` (pure function in continual.gating).

    A causal LM is judged on per-row mean token log-likelihoods (paired bootstrap; tolerances
    in nats), its forgetting per batch is the drop in mean log-likelihood (log of the
    perplexity ratio), and a first champion's floor is the share of rows it predicts better
    than a uniform guess over the vocabulary (`gate.min_accuracy`).
    """
    started = time.perf_counter()
    learned = champion.learned if champion else frozenset()
    new, retention = split_by_learned(memory, learned, "gate")
    if new.empty:
        raise ConfigError(
            "no gate rows to evaluate on: the batches the champion has not learned are too "
            f"small for data.gate_fraction {cfg.data.gate_fraction} — land larger batches or "
            f"raise data.min_rows ({cfg.data.min_rows})"
        )
    new, retention, left_out = _scorable(challenger, new, retention, cfg.data.label)
    if new.empty:
        raise ConfigError(
            "no gate rows to evaluate on: every gate row of the batches the champion has not "
            "learned has fewer than 2 tokens, so a causal LM has no token of them to predict"
        )
    scores, reports = _paired_scores(cfg, champion, challenger, new, retention)
    challenger_new, challenger_retention = scores["challenger"]
    champion_new, champion_retention = scores.get("champion", (None, None))
    assert challenger_new is not None  # the gate has new rows (checked above)
    judged_new, floor_score = challenger_new, "accuracy"
    if champion is None and challenger.spec.family == CAUSAL_LM:
        judged_new = beats_uniform(challenger_new, challenger.spec.n_classes)
        floor_score = "share of rows predicted better than a uniform guess"
    decision = decide(
        challenger_new_correct=judged_new,
        champion_new_correct=champion_new,
        challenger_retention_correct=challenger_retention,
        champion_retention_correct=champion_retention,
        retention_groups=None if retention.empty else retention[BATCH_COLUMN].astype(str).tolist(),
        references=champion.references if champion else None,
        policy=gate_policy(cfg),
        floor_score=floor_score,
    )
    if left_out:
        decision = replace(decision, reasons=(*decision.reasons, left_out))
    logger = get_run_logger()
    for reason in decision.reasons:
        logger.info("gate: %s", reason)
    references = _references(champion, new, challenger_new, decision)
    return Evaluation(
        decision,
        replace(challenger, references=references),
        new,
        retention=retention,
        selection=memory.held_out.get("select", pd.DataFrame()),
        class_reports=reports,
        seconds=time.perf_counter() - started,
    )
