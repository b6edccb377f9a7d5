"""What the promotion gate is told and what it answers: `GatePolicy` (tolerances and test
settings, from the config's `gate` section) and `GateDecision` (the verdict, its reasons and the
numbers behind them, as they go on the MLflow run and the version's tags).

The rule itself, and why each check exists, is `continual.gating`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from continual.paired_tests import PairedTestResult

NEW_DATA_RULES = ("non_inferior", "superior")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class GatePolicy:
    """Tolerances (accuracy as a fraction, 0.01 = 1 point) and test settings of the gate.

    Two bounds with different jobs. The tolerances (5 pts on new data and on retention) are the
    evidence margins of each promotion: the one-sided 95% lower bound of the paired difference must clear it, which
    a challenger can do with the ~100-200 held-out rows small pipelines have. What may really
    be lost is `forgetting_budget` (2.5 pts), the point estimate against fixed per-batch
    references. Measured in `benchmarks/bench_gate.py` (1,000 trials per cell; churn = the
    discordance at no net change): P(promote | retention loss ≥ 6 pts) ≤ 2.3% over the whole
    grid; P(promote | +5 pts new, retention unchanged, n_new ≥ 200, n_retention ≥ 500) ≥ 95%
    at churn 0.06 and ≥ 85% at 0.10; an observed 3-pt loss against its batch's reference is
    never promoted. Because the budget is a point estimate, a true 4-pt loss still passes in up
    to 15% of trials at n_retention 200-500: lower `forgetting_budget` (or the tolerance) for a
    stricter pipeline, at the price of rejected updates when held-out sets are small.
    """

    new_data_tolerance: float = field(
        default=0.05, metadata=_help("Non-inferiority margin on the new batch's held-out split.")
    )
    retention_tolerance: float = field(
        default=0.05, metadata=_help("Non-inferiority margin on the retention set, per promotion.")
    )
    confidence: float = field(
        default=0.95, metadata=_help("One-sided confidence level; α = 1 − confidence.")
    )
    new_data_rule: Literal["non_inferior", "superior"] = field(
        default="non_inferior",
        metadata=_help("'non_inferior': LCB > −new_data_tolerance; 'superior': LCB > 0."),
    )
    forgetting_budget: float = field(
        default=0.025,
        metadata=_help("Allowed cumulative loss vs the fixed per-batch reference accuracies."),
    )
    exchange_gain: float | None = field(
        default=0.10,
        metadata=_help(
            "Proven new-data gain (one-sided LCB) that may buy a bounded retention loss (rule "
            "2d); None: never."
        ),
    )
    exchange_max_loss: float = field(
        default=0.10,
        metadata=_help(
            "What an exchange (rule 2d) may give up at most: retention loss and cumulative "
            "forgetting, point estimates; the exchange also needs a net gain on new + "
            "retention rows together."
        ),
    )
    min_examples: int = field(
        default=500, metadata=_help("Fewer paired examples than this flag a check underpowered.")
    )
    min_accuracy: float = field(
        default=0.0, metadata=_help("New-data accuracy floor for the first champion.")
    )
    n_bootstrap: int = field(default=2000, metadata=_help("Resamples of the paired bootstrap."))
    seed: int = field(default=0, metadata=_help("Seed of the paired bootstrap."))

    def __post_init__(self) -> None:
        for name in ("new_data_tolerance", "retention_tolerance", "forgetting_budget"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1) (0.01 = 1 point), got {value}")
        if not 0.5 < self.confidence < 1.0:
            raise ValueError(
                f"confidence is a one-sided level and must be in (0.5, 1), got {self.confidence}"
            )
        if self.new_data_rule not in NEW_DATA_RULES:
            raise ValueError(
                f"new_data_rule must be one of {NEW_DATA_RULES}, got {self.new_data_rule!r}"
            )
        if not 0.0 <= self.exchange_max_loss < 1.0:
            raise ValueError(
                f"exchange_max_loss must be in [0, 1) (0.01 = 1 point), got {self.exchange_max_loss}"
            )
        if self.exchange_gain is not None and not 0.0 < self.exchange_gain < 1.0:
            raise ValueError(f"exchange_gain must be in (0, 1) or None, got {self.exchange_gain}")
        if self.min_examples < 1:
            raise ValueError(f"min_examples must be >= 1, got {self.min_examples}")
        if not 0.0 <= self.min_accuracy <= 1.0:
            raise ValueError(f"min_accuracy must be in [0, 1], got {self.min_accuracy}")
        if self.n_bootstrap < 1:
            raise ValueError(f"n_bootstrap must be >= 1, got {self.n_bootstrap}")


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict, its reasons, and the numbers behind them.

    `new_data`/`retention` hold the paired tests (their `ci_low` is the one-sided lower bound);
    `retention_by_batch` the challenger's accuracy on each batch's retention rows (store it as the
    batch's reference when it should become one); `forgetting` the accumulated loss against the
    references (None when none applied); `exchanged` whether the exchange (rule 2d) promoted it —
    the loss it traded is then accepted, and the batches' references move down to what the
    challenger keeps (`rebased_references`).
    """

    promote: bool
    reasons: tuple[str, ...]
    new_data: PairedTestResult | None
    retention: PairedTestResult | None
    challenger_new_accuracy: float
    challenger_retention_accuracy: float | None
    negative_flip_rate: float | None
    new_data_mde: float | None = None
    retention_mde: float | None = None
    underpowered: bool = False
    forgetting: float | None = None
    retention_by_batch: dict[str, float] = field(default_factory=dict)
    policy: GatePolicy | None = None
    exchanged: bool = False

    def to_metrics(self) -> dict[str, float]:
        """Flat float metrics for MLflow ("gate.promote", "gate.new.lcb", ...); None omitted."""
        metrics = {
            "gate.promote": float(self.promote),
            "gate.exchanged": float(self.exchanged),
            "gate.underpowered": float(self.underpowered),
            "gate.challenger_new_accuracy": self.challenger_new_accuracy,
        }
        optional = {
            "gate.challenger_retention_accuracy": self.challenger_retention_accuracy,
            "gate.negative_flip_rate": self.negative_flip_rate,
            "gate.forgetting": self.forgetting,
            "gate.new.mde": self.new_data_mde,
            "gate.retention.mde": self.retention_mde,
        }
        metrics.update({key: float(value) for key, value in optional.items() if value is not None})
        fields = ("n", "champion_mean", "challenger_mean", "diff", "ci_low", "ci_high", "p_value")
        for prefix, test in (("gate.new", self.new_data), ("gate.retention", self.retention)):
            if test is not None:
                metrics.update({f"{prefix}.{f}": float(getattr(test, f)) for f in fields})
                metrics[f"{prefix}.lcb"] = float(test.ci_low)
        return metrics

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record of the decision, with its reasons and policy."""
        return {
            "promote": self.promote,
            "reasons": list(self.reasons),
            "new_data": None if self.new_data is None else self.new_data.to_dict(),
            "retention": None if self.retention is None else self.retention.to_dict(),
            "challenger_new_accuracy": self.challenger_new_accuracy,
            "challenger_retention_accuracy": self.challenger_retention_accuracy,
            "negative_flip_rate": self.negative_flip_rate,
            "new_data_mde": self.new_data_mde,
            "retention_mde": self.retention_mde,
            "underpowered": self.underpowered,
            "forgetting": self.forgetting,
            "retention_by_batch": dict(self.retention_by_batch),
            "exchanged": self.exchanged,
            "policy": None if self.policy is None else asdict(self.policy),
        }


def rebased_references(references: dict[str, float], decision: GateDecision) -> dict[str, float]:
    """The references a promoted challenger carries on: after an exchange, each earlier batch's
    reference falls to the challenger's accuracy on it where that is lower — the loss was traded
    in the open for a proven gain, and charging it again at every later update would reject
    them all (an arriving class that overlaps old ones costs even joint training old accuracy,
    every time). Otherwise the references stay fixed, so unexplained losses still add up."""
    if not decision.exchanged:
        return dict(references)
    kept = decision.retention_by_batch
    return {b: min(ref, kept[b]) if b in kept else ref for b, ref in references.items()}
