"""The promotion gate: paired tests of challenger vs champion, and the pure decision function.

Both models are scored on the same examples, so the comparison is paired: per-example
correctness goes to McNemar's test (only discordant examples carry information), other
per-example scores to a paired bootstrap of the mean difference.

Decision rule (`decide`), with diff = challenger − champion on the same examples:

1. No champion: promote iff the challenger's accuracy on the new data ≥ `min_accuracy`.
2. Otherwise, for the new-data held-out split (tolerance `new_data_tolerance`) and, when a
   retention set is given, for the retention set (tolerance `retention_tolerance`, forgetting),
   reject when either
   a. the drop is beyond the tolerance AND significant: diff < −tolerance and the paired test's
      two-sided p < 1 − confidence (McNemar for 0/1 correctness, paired bootstrap otherwise), or
   b. the whole confidence interval of diff lies beyond the tolerance: ci_high < −tolerance.
      Rule (b) guards short validation sets, where a large drop can fail to reach significance
      in the exact test while the interval already rules out an acceptable difference.
3. Promote when neither check rejects. A drop beyond the tolerance that is not significant is
   treated as noise (a short, noisy validation set must not block good updates) and says so.

Every check adds one reason — a full sentence with the accuracies, the difference in points,
its interval and p-value, and the tolerance — whether it accepts or rejects.

Interval for McNemar results: Newcombe's (1998) hybrid score interval for a difference of paired
proportions (his method 10: Wilson intervals of both accuracies combined with the continuity-
corrected correlation φ). It stays inside [−1, 1] and keeps close to nominal coverage for small
n and accuracies near 1, where the Wald interval collapses.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

MCNEMAR_EXACT = "McNemar exact"
MCNEMAR_CHI2 = "McNemar chi2 (continuity-corrected)"
BOOTSTRAP = "paired bootstrap"
EXACT_BELOW = 25  # discordant pairs below which McNemar uses the exact binomial test


@dataclass(frozen=True)
class PairedTestResult:
    """A paired comparison of two models on the same examples (diff = challenger − champion)."""

    name: str
    method: str
    n: int
    champion_mean: float
    challenger_mean: float
    diff: float
    ci_low: float
    ci_high: float
    confidence: float
    p_value: float

    def to_dict(self) -> dict[str, float | int | str]:
        """Plain fields (JSON-able)."""
        return asdict(self)


def _paired_arrays(champion: ArrayLike, challenger: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    old = np.asarray(champion, dtype=np.float64).ravel()
    new = np.asarray(challenger, dtype=np.float64).ravel()
    if old.shape != new.shape:
        raise ValueError(
            f"paired scores differ in length: champion {old.size}, challenger {new.size} "
            "(both models must be scored on the same examples)"
        )
    if old.size == 0:
        raise ValueError("paired test needs at least one example, got none")
    if not (np.isfinite(old).all() and np.isfinite(new).all()):
        raise ValueError("paired scores contain NaN or inf")
    return old, new


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def paired_bootstrap(
    champion_scores: ArrayLike,
    challenger_scores: ArrayLike,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    name: str = "scores",
) -> PairedTestResult:
    """Paired bootstrap of the mean per-example difference (challenger − champion).

    Resamples examples (keeping each pair together), vectorised in chunks of resamples. The
    interval is the percentile interval of the resampled means; the two-sided p-value is that of
    the bootstrap distribution shifted to mean 0 (H0: diff == 0):
    (1 + #{|m* − d̄| ≥ |d̄|}) / (R + 1).

    Raises:
        ValueError: different lengths, no examples, non-finite scores, or bad parameters.
    """
    _check_confidence(confidence)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    old, new = _paired_arrays(champion_scores, challenger_scores)
    diffs = new - old
    n = diffs.size
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    rows_per_chunk = max(1, 2_000_000 // n)
    for start in range(0, n_resamples, rows_per_chunk):
        rows = min(rows_per_chunk, n_resamples - start)
        means[start : start + rows] = diffs[rng.integers(0, n, size=(rows, n))].mean(axis=1)
    observed = float(diffs.mean())
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    # 1e-12 absorbs rounding so that an exactly-zero observed difference gives p = 1.
    extreme = np.count_nonzero(np.abs(means - observed) >= abs(observed) - 1e-12)
    return PairedTestResult(
        name=name,
        method=BOOTSTRAP,
        n=n,
        champion_mean=float(old.mean()),
        challenger_mean=float(new.mean()),
        diff=observed,
        ci_low=float(low),
        ci_high=float(high),
        confidence=confidence,
        p_value=float(min(1.0, (1 + extreme) / (n_resamples + 1))),
    )


def _wilson(successes: int, n: int, z: float) -> tuple[float, float]:
    centre = (successes + z * z / 2) / (n + z * z)
    half = z * math.sqrt(successes * (n - successes) / n + z * z / 4) / (n + z * z)
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_paired_ci(
    both: int, only_challenger: int, only_champion: int, neither: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Newcombe's method-10 interval for (challenger accuracy − champion accuracy).

    Args:
        both, only_challenger, only_champion, neither: the paired 2×2 table of correctness.

    Returns:
        (low, high).
    """
    n = both + only_challenger + only_champion + neither
    z = float(stats.norm.ppf(1 - (1 - confidence) / 2))
    p1, p2 = (both + only_challenger) / n, (both + only_champion) / n
    l1, u1 = _wilson(both + only_challenger, n, z)
    l2, u2 = _wilson(both + only_champion, n, z)
    margins = ((both + only_challenger) * (only_champion + neither) * (both + only_champion)) * (
        only_challenger + neither
    )
    cross = both * neither - only_challenger * only_champion
    corrected = max(cross - n / 2, 0.0) if cross > 0 else cross
    phi = corrected / math.sqrt(margins) if margins > 0 else 0.0
    diff = p1 - p2
    below = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    above = (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2
    return max(-1.0, diff - math.sqrt(max(below, 0.0))), min(1.0, diff + math.sqrt(max(above, 0.0)))


def mcnemar_test(
    champion_correct: ArrayLike,
    challenger_correct: ArrayLike,
    *,
    confidence: float = 0.95,
    name: str = "accuracy",
) -> PairedTestResult:
    """McNemar's test on per-example correctness, with Newcombe's interval of the difference.

    With b = champion right/challenger wrong and c = the reverse: exact two-sided binomial test
    (p = min(1, 2·P[Bin(b+c, ½) ≤ min(b, c)])) when b + c < 25, otherwise the chi-square test with
    continuity correction, max(|b − c| − 1, 0)² / (b + c) on 1 degree of freedom.

    Raises:
        ValueError: different lengths, no examples, or values other than 0/1.
    """
    _check_confidence(confidence)
    old, new = _paired_arrays(champion_correct, challenger_correct)
    if not (np.isin(old, (0.0, 1.0)).all() and np.isin(new, (0.0, 1.0)).all()):
        raise ValueError(f"{name}: McNemar needs per-example correctness (bool or 0/1)")
    old_right, new_right = old.astype(bool), new.astype(bool)
    only_champion = int(np.count_nonzero(old_right & ~new_right))
    only_challenger = int(np.count_nonzero(~old_right & new_right))
    both = int(np.count_nonzero(old_right & new_right))
    neither = old.size - both - only_champion - only_challenger
    discordant = only_champion + only_challenger
    if discordant < EXACT_BELOW:
        method = MCNEMAR_EXACT
        tail = stats.binom.cdf(min(only_champion, only_challenger), discordant, 0.5)
        p_value = 1.0 if discordant == 0 else min(1.0, 2.0 * float(tail))
    else:
        method = MCNEMAR_CHI2
        statistic = max(abs(only_champion - only_challenger) - 1, 0) ** 2 / discordant
        p_value = float(stats.chi2.sf(statistic, df=1))
    low, high = newcombe_paired_ci(both, only_challenger, only_champion, neither, confidence)
    return PairedTestResult(
        name=name,
        method=method,
        n=old.size,
        champion_mean=float(old.mean()),
        challenger_mean=float(new.mean()),
        diff=(only_challenger - only_champion) / old.size,
        ci_low=low,
        ci_high=high,
        confidence=confidence,
        p_value=p_value,
    )


@dataclass(frozen=True)
class GatePolicy:
    """Tolerances (accuracy as a fraction, 0.01 = 1 point) and test settings of the gate."""

    new_data_tolerance: float = 0.01
    retention_tolerance: float = 0.02
    confidence: float = 0.95
    min_accuracy: float = 0.0
    n_bootstrap: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.new_data_tolerance < 0 or self.retention_tolerance < 0:
            raise ValueError("gate tolerances must be >= 0")
        _check_confidence(self.confidence)
        if not 0.0 <= self.min_accuracy <= 1.0:
            raise ValueError(f"min_accuracy must be in [0, 1], got {self.min_accuracy}")
        if self.n_bootstrap < 1:
            raise ValueError(f"n_bootstrap must be >= 1, got {self.n_bootstrap}")


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict, its reasons, and the numbers behind them."""

    promote: bool
    reasons: tuple[str, ...]
    new_data: PairedTestResult | None
    retention: PairedTestResult | None
    challenger_new_accuracy: float
    challenger_retention_accuracy: float | None
    negative_flip_rate: float | None
    policy: GatePolicy | None = None

    def to_metrics(self) -> dict[str, float]:
        """Flat float metrics for MLflow ("gate.promote", "gate.new.diff", ...); None omitted."""
        metrics = {
            "gate.promote": float(self.promote),
            "gate.challenger_new_accuracy": self.challenger_new_accuracy,
        }
        if self.challenger_retention_accuracy is not None:
            metrics["gate.challenger_retention_accuracy"] = self.challenger_retention_accuracy
        if self.negative_flip_rate is not None:
            metrics["gate.negative_flip_rate"] = self.negative_flip_rate
        fields = ("n", "champion_mean", "challenger_mean", "diff", "ci_low", "ci_high", "p_value")
        for prefix, test in (("gate.new", self.new_data), ("gate.retention", self.retention)):
            if test is not None:
                metrics.update({f"{prefix}.{f}": float(getattr(test, f)) for f in fields})
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
            "policy": None if self.policy is None else asdict(self.policy),
        }


def _scores(values: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0 or not np.isfinite(array).all():
        raise ValueError(f"{name} must be a non-empty array of finite per-example scores")
    return array


def _is_binary(*arrays: np.ndarray) -> bool:
    return all(np.isin(a, (0.0, 1.0)).all() for a in arrays)


def _paired(
    champion: np.ndarray, challenger: np.ndarray, name: str, policy: GatePolicy
) -> PairedTestResult:
    if _is_binary(champion, challenger):
        return mcnemar_test(champion, challenger, confidence=policy.confidence, name=name)
    return paired_bootstrap(
        champion,
        challenger,
        n_resamples=policy.n_bootstrap,
        confidence=policy.confidence,
        seed=policy.seed,
        name=name,
    )


def _pts(value: float, signed: bool = True) -> str:
    text = f"{value * 100:+.1f}" if signed else f"{value * 100:.1f}"
    return text.replace("-", "−")


def _p(p_value: float) -> str:
    return f"{p_value:.2g}" if p_value < 0.001 else f"{p_value:.3f}".rstrip("0").rstrip(".")


def _judge(test: PairedTestResult, label: str, tolerance: float) -> tuple[bool, str]:
    """Apply rules 2a/2b to one paired test: (accept?, reason sentence)."""
    alpha = 1.0 - test.confidence
    level = f"{test.confidence * 100:g}%"
    test_name = "McNemar" if test.method.startswith("McNemar") else "bootstrap"
    metric = "accuracy" if test.method.startswith("McNemar") else "mean score"
    change = test.diff
    verb = f"fell {_pts(-change, False)} pts" if change < 0 else f"rose {_pts(change, False)} pts"
    if change == 0:
        verb = "was unchanged"
    summary = (
        f"{label} {metric} {verb} ({test.champion_mean:.3f} → {test.challenger_mean:.3f}, "
        f"{level} CI {_pts(test.ci_low)} … {_pts(test.ci_high)}, "
        f"{test_name} p={_p(test.p_value)}, n={test.n})"
    )
    allowed = f"the {_pts(tolerance, False)}-pt tolerance"
    if test.ci_high < -tolerance:
        return False, f"{summary} — the whole {level} interval lies beyond {allowed}."
    if change < -tolerance and test.p_value < alpha:
        return False, f"{summary} — beyond {allowed} and significant (p < {alpha:g})."
    if change < -tolerance:
        return True, (
            f"{summary} — beyond {allowed} but not significant at {level}, so treated as noise."
        )
    return True, f"{summary} — within {allowed}."


def decide(
    *,
    challenger_new_correct: ArrayLike,
    champion_new_correct: ArrayLike | None = None,
    challenger_retention_correct: ArrayLike | None = None,
    champion_retention_correct: ArrayLike | None = None,
    policy: GatePolicy = GatePolicy(),
) -> GateDecision:
    """Promote or reject a challenger (the rule is in the module docstring).

    Args:
        challenger_new_correct: per-example correctness (or scores) on the new batch's
            held-out split.
        champion_new_correct: the champion's on the same examples; None when there is no champion.
        challenger_retention_correct, champion_retention_correct: the same on the retention set
            (both or neither when there is a champion).
        policy: tolerances and test settings.

    Returns:
        The decision with its reasons, test results and metrics.

    Raises:
        ValueError: arrays of different lengths, empty or non-finite, or an inconsistent set of
            arguments (a champion's retention scores without the challenger's, and so on).
    """
    new = _scores(challenger_new_correct, "challenger_new_correct")
    retained = None
    if challenger_retention_correct is not None:
        retained = _scores(challenger_retention_correct, "challenger_retention_correct")
    retained_accuracy = None if retained is None else float(retained.mean())
    if champion_new_correct is None:
        if champion_retention_correct is not None:
            raise ValueError("champion_retention_correct was given without champion_new_correct")
        return _first_champion(float(new.mean()), retained_accuracy, policy)
    champion_new = _scores(champion_new_correct, "champion_new_correct")
    new_test = _paired(champion_new, new, "new-data", policy)
    checks = [_judge(new_test, "new-data", policy.new_data_tolerance)]
    retention_test = None
    flips: tuple[np.ndarray, np.ndarray] = (champion_new, new)
    if champion_retention_correct is not None:
        if retained is None:
            raise ValueError(
                "champion_retention_correct was given but challenger_retention_correct was not: "
                "score both models on the retention set"
            )
        champion_retained = _scores(champion_retention_correct, "champion_retention_correct")
        retention_test = _paired(champion_retained, retained, "retention", policy)
        checks.append(_judge(retention_test, "retention", policy.retention_tolerance))
        flips = (champion_retained, retained)
    reasons = [reason for _, reason in checks]
    if retention_test is None:
        reasons.append("No retention set was scored for both models: forgetting was not checked.")
    nfr = None
    if _is_binary(*flips):
        nfr = float(np.mean(flips[0].astype(bool) & ~flips[1].astype(bool)))
    return GateDecision(
        promote=all(ok for ok, _ in checks),
        reasons=tuple(reasons),
        new_data=new_test,
        retention=retention_test,
        challenger_new_accuracy=float(new.mean()),
        challenger_retention_accuracy=retained_accuracy,
        negative_flip_rate=nfr,
        policy=policy,
    )


def _first_champion(
    accuracy: float, retained_accuracy: float | None, policy: GatePolicy
) -> GateDecision:
    promote = accuracy >= policy.min_accuracy
    verdict = "meets" if promote else "is below"
    reason = (
        f"No champion yet: new-data accuracy {accuracy:.3f} {verdict} the "
        f"{policy.min_accuracy:.3f} floor (min_accuracy)."
    )
    return GateDecision(
        promote=promote,
        reasons=(reason,),
        new_data=None,
        retention=None,
        challenger_new_accuracy=accuracy,
        challenger_retention_accuracy=retained_accuracy,
        negative_flip_rate=None,
        policy=policy,
    )
