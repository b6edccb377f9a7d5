"""Paired comparisons of two models scored on the same examples (diff = challenger − champion).

Per-example correctness goes to McNemar's test and Newcombe's interval (only discordant examples
carry information), other per-example scores to a paired bootstrap of the mean difference. The
promotion gate (`continual.gating.decide`) builds its checks on these.

SE of the paired difference: for 0/1 correctness with b = champion-only and c = challenger-only
correct examples out of n, SE = sqrt(max(b + c, 3)/n − ((c − b)/n)²)/sqrt(n). The floor of three
discordant pairs is the rule of three (zero events in n leave a 95% upper bound of ≈ 3/n on
their rate), so zero observed discordance never claims unlimited power. For other scores,
SE = sqrt(max(s², 3·range²/n))/sqrt(n) with s² the (ddof=0) variance of the per-example
differences and range that of all scores: the same floor on the scores' own scale.

Interval for McNemar results: Newcombe's (1998) hybrid score interval for a difference of paired
proportions (his method 10: Wilson intervals of both accuracies combined with the continuity-
corrected correlation φ). It stays inside [−1, 1] and keeps close to nominal coverage for small
n and accuracies near 1, where the Wald interval collapses.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np
from numpy.typing import ArrayLike
from scipy import special

MCNEMAR_EXACT = "McNemar exact"
MCNEMAR_CHI2 = "McNemar chi2 (continuity-corrected)"
BOOTSTRAP = "paired bootstrap"
EXACT_BELOW = 25  # discordant pairs below which McNemar uses the exact binomial test
MIN_DISCORDANT = 3  # rule-of-three floor on discordant pairs for the SE behind the MDE
MDE_POWER = 0.8


@dataclass(frozen=True)
class PairedTestResult:
    """A paired comparison of two models on the same examples (diff = challenger − champion).

    `ci_low`/`ci_high` form a two-sided interval at `confidence`; `se` is the (floored) standard
    error of diff used for the minimum detectable effect.
    """

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
    se: float

    @property
    def on_correctness(self) -> bool:
        """Whether the scores were 0/1 correctness (McNemar), so differences are accuracy
        points; otherwise they are in the score's own unit (the paired bootstrap)."""
        return self.method in (MCNEMAR_EXACT, MCNEMAR_CHI2)

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
    interval is the two-sided percentile interval of the resampled means; the two-sided p-value
    is that of the bootstrap distribution shifted to mean 0 (H0: diff == 0):
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
    spread = float(max(old.max(), new.max()) - min(old.min(), new.min()))
    variance = max(float(diffs.var()), MIN_DISCORDANT * spread**2 / n)
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
        se=math.sqrt(variance / n),
    )


def _z(quantile: float) -> float:
    """Standard normal quantile (stdlib: ~50× faster than scipy.stats for one scalar)."""
    return NormalDist().inv_cdf(quantile)


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
        confidence: two-sided level of the interval.

    Returns:
        (low, high).
    """
    n = both + only_challenger + only_champion + neither
    z = _z(1 - (1 - confidence) / 2)
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


def paired_se(only_champion: int, only_challenger: int, n: int) -> float:
    """SE of a paired difference of accuracies, floored at MIN_DISCORDANT discordant pairs.

    sqrt(max(b + c, 3)/n − ((c − b)/n)²)/sqrt(n), with b = `only_champion`, c = `only_challenger`.
    """
    discordance = max(only_champion + only_challenger, MIN_DISCORDANT) / n
    return math.sqrt(max(discordance - ((only_challenger - only_champion) / n) ** 2, 0.0) / n)


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
    continuity correction, max(|b − c| − 1, 0)² / (b + c) on 1 degree of freedom. The interval
    is two-sided at `confidence`.

    Raises:
        ValueError: different lengths, no examples, or values other than 0/1.
    """
    _check_confidence(confidence)
    old, new = _paired_arrays(champion_correct, challenger_correct)
    if not is_binary(old, new):
        raise ValueError(f"{name}: McNemar needs per-example correctness (bool or 0/1)")
    old_right, new_right = old.astype(bool), new.astype(bool)
    only_champion = int(np.count_nonzero(old_right & ~new_right))
    only_challenger = int(np.count_nonzero(~old_right & new_right))
    both = int(np.count_nonzero(old_right & new_right))
    neither = old.size - both - only_champion - only_challenger
    discordant = only_champion + only_challenger
    if discordant < EXACT_BELOW:
        method = MCNEMAR_EXACT
        tail = special.bdtr(min(only_champion, only_challenger), discordant, 0.5)
        p_value = 1.0 if discordant == 0 else min(1.0, 2.0 * float(tail))
    else:
        method = MCNEMAR_CHI2
        statistic = max(abs(only_champion - only_challenger) - 1, 0) ** 2 / discordant
        p_value = float(special.chdtrc(1, statistic))
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
        se=paired_se(only_champion, only_challenger, old.size),
    )


def minimum_detectable_effect(se: float, *, confidence: float, power: float = MDE_POWER) -> float:
    """(z_confidence + z_power)·se: the true effect a one-sided test at `confidence` detects with
    probability `power` (equivalently, the tolerance an unchanged challenger clears that often)."""
    return (_z(confidence) + _z(power)) * se


def is_binary(*arrays: np.ndarray) -> bool:
    """True iff every value of every array is 0 or 1 (per-example correctness)."""
    return all(bool(((a == 0.0) | (a == 1.0)).all()) for a in arrays)
