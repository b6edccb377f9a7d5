"""What a flow run did, and the one task that records it: ledger, event, Prefect artifacts.

`FlowOutcome` is the type every flow returns (the CLI, the demo and the report read it). It is
defined here, beside `conclude`, because the tasks layer records it; flows build and return it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from data_plane.messages import clip_middle
from evergreen.config import EvergreenConfig
from model_registry.ledger import REASONS_SEPARATOR, Outcome
from tasks import ledger
from tasks.events import emit

Decision = Literal[
    "promoted", "rejected", "quarantined", "skipped", "drift", "rolled-back", "failed"
]
# What the ledger records for the run's accepted batches, per decision.
LEDGER_OUTCOME: dict[str, Outcome] = {
    "promoted": "promoted",
    "rejected": "rejected",
    "skipped": "skipped",
    "drift": "skipped",
    "failed": "failed",
}

REASON_LIMIT = 2000  # characters of a quarantine reason in the ledger (an MLflow tag)


@dataclass
class FlowOutcome:
    """The summary of one flow run.

    Attributes:
        cadence: the flow's name.
        decision: promoted | rejected | quarantined | skipped | drift | rolled-back | failed.
        batch_ids: the accepted batches it processed.
        version: the challenger registered (or the version a rollback restored).
        champion: the champion after the run.
        reasons: full sentences, the gate's first.
        metrics: flat numbers (gate statistics, drift, calibration).
        quarantined: batches that failed validation in this run → why.
        verdict_keys: quarantined batch → what its verdict depended on
            (`tasks.validate.verdict_keys`: the content fingerprint, so other cadences need not
            announce it again, and the files' listing, so a batch fixed in place is taken again).
    """

    cadence: str
    decision: Decision
    batch_ids: list[str] = field(default_factory=list)
    version: str | None = None
    champion: str | None = None
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    quarantined: dict[str, str] = field(default_factory=dict)
    verdict_keys: dict[str, dict[str, str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """What the flow returns (and `evergreen run` prints): the verdict keys are ledger
        bookkeeping, not part of the result."""
        result = asdict(self)
        del result["verdict_keys"]
        return result


@task(cache_policy=NO_CACHE)
def conclude(cfg: EvergreenConfig, outcome: FlowOutcome, *, forced: bool = False) -> dict[str, Any]:
    """Record the run: ledger entries per batch, the decision's event, Markdown + table artifacts.

    Returns the outcome as a dict (what the flow returns).
    """
    details = {"reasons": REASONS_SEPARATOR.join(outcome.reasons)[:4000]}
    if outcome.version is not None:  # none registered (quarantine, discarded, failed)
        details["version"] = str(outcome.version)
    if outcome.champion is not None:  # the report's champion column: not the challenger's number
        details["champion"] = str(outcome.champion)
    if outcome.decision in LEDGER_OUTCOME and outcome.batch_ids:
        ledger.record(
            cfg,
            outcome.cadence,
            outcome.batch_ids,
            LEDGER_OUTCOME[outcome.decision],
            details=details,
            forced=forced,
        )
    for batch_id, reason in outcome.quarantined.items():
        ledger.record(
            cfg,
            outcome.cadence,
            [batch_id],
            "quarantined",
            details={
                "reason": clip_middle(reason, REASON_LIMIT),
                **outcome.verdict_keys.get(batch_id, {}),
            },
        )
    if outcome.decision in ("promoted", "rejected"):
        emit(
            f"evergreen.model.{outcome.decision}",
            cfg,
            {"cadence": outcome.cadence, "version": outcome.version, "champion": outcome.champion},
        )
    create_markdown_artifact(
        key=f"{outcome.cadence}-decision", markdown=decision_markdown(cfg, outcome)
    )
    if outcome.metrics:
        rows = [{"metric": k, "value": round(v, 5)} for k, v in sorted(outcome.metrics.items())]
        create_table_artifact(key=f"{outcome.cadence}-gate", table=rows)
    get_run_logger().info(
        "%s: %s (%s)",
        outcome.cadence,
        outcome.decision,
        f"champion v{outcome.champion}" if outcome.champion else "no champion yet",
    )
    return outcome.to_dict()


def decision_markdown(cfg: EvergreenConfig, outcome: FlowOutcome) -> str:
    lines = [
        f"# {outcome.cadence}: {outcome.decision.upper()}",
        "",
        f"- batches: {', '.join(outcome.batch_ids) or '—'}",
        f"- challenger: v{outcome.version}" if outcome.version else "- challenger: none",
        f"- champion now: v{outcome.champion}" if outcome.champion else "- champion: none",
        f"- registry: `{cfg.tracking_uri}` model `{cfg.registry.name}`",
        "",
        "## Reasons",
        *[f"- {r}" for r in outcome.reasons],
    ]
    if outcome.quarantined:
        lines += ["", "## Quarantined", *[f"- {b}: {r}" for b, r in outcome.quarantined.items()]]
    if outcome.metrics:
        lines += ["", "## Gate metrics", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(outcome.metrics.items())]
    return "\n".join(lines)
