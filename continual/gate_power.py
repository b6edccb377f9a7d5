"""Power of the promotion gate: paired correctness with known true effects, and promotion rates.

A pair of models scored on the same n examples is described by the champion's accuracy p, the
discordance d (share of examples on which exactly one of the two is right) and the true
difference δ = challenger − champion accuracy. The two discordant cells then have probabilities
b = (d − δ)/2 (champion right, challenger wrong) and c = (d + δ)/2 (the reverse), so d ≥ |δ|.

`paired_correctness` draws such pairs for many trials at once (`exact_paired_correctness` with
exact discordant counts: a loss that is certain rather than sampled); `promotion_rates` runs
decision rules (`gate_rule`: `continual.gating.decide` with or without the fixed-reference
forgetting budget) over the trials of a `Scenario` and returns the share of trials promoted: the
gate's operating characteristics, used by `benchmarks/bench_gate.py` and the unit tests.
`noninferiority_power` is the normal approximation of one check's pass rate, for checking the
simulation and sizing sets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

from continual.gate_policy import GatePolicy
from continual.gating import decide


def _cells(accuracy: float, discordance: float, effect: float) -> tuple[float, float]:
    """(P(break | champion right), P(fix | champion wrong)) for the given p, d, δ."""
    if not 0.0 < accuracy < 1.0:
        raise ValueError(f"accuracy must be in (0, 1), got {accuracy}")
    if not abs(effect) <= discordance <= 1.0:
        raise ValueError(f"discordance must be in [|effect|, 1], got d={discordance}, δ={effect}")
    broken, fixed = (discordance - effect) / 2.0, (discordance + effect) / 2.0
    if broken > accuracy or fixed > 1.0 - accuracy:
        raise ValueError(
            f"accuracy {accuracy} cannot lose {broken:.3f} and gain {fixed:.3f} of the examples "
            "(need (d − δ)/2 ≤ p and (d + δ)/2 ≤ 1 − p)"
        )
    return broken / accuracy, fixed / (1.0 - accuracy)


def successor(
    rng: np.random.Generator,
    correct: np.ndarray,
    *,
    accuracy: float,
    discordance: float,
    effect: float,
) -> np.ndarray:
    """Correctness of a successor model on the same examples as `correct`.

    Args:
        correct: boolean correctness of the predecessor, any shape.
        accuracy: the predecessor's TRUE accuracy (not the sample mean of `correct`).
        discordance, effect: d and δ of the pair (module docstring).

    Returns:
        Boolean array of the same shape.
    """
    p_break, p_fix = _cells(accuracy, discordance, effect)
    draw = rng.random(correct.shape)
    return np.where(correct, draw >= p_break, draw < p_fix)


def paired_correctness(
    rng: np.random.Generator,
    *,
    trials: int,
    n: int,
    accuracy: float,
    discordance: float,
    effect: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(champion, challenger) boolean correctness, each of shape (trials, n)."""
    champion = rng.random((trials, n)) < accuracy
    challenger = successor(rng, champion, accuracy=accuracy, discordance=discordance, effect=effect)
    return champion, challenger


def exact_paired_correctness(
    rng: np.random.Generator,
    *,
    trials: int,
    n: int,
    accuracy: float,
    only_champion: int,
    only_challenger: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(champion, challenger) correctness, shape (trials, n), with EXACT discordant counts.

    The champion's rows are drawn as in `paired_correctness`; the challenger then breaks exactly
    `only_champion` of the champion's right rows and fixes exactly `only_challenger` of its wrong
    ones (chosen at random), so the observed difference is exactly
    (only_challenger − only_champion)/n in every trial: a loss that is certain, not sampled.

    Raises:
        ValueError: negative counts, or a trial whose champion has too few right or wrong rows.
    """
    if only_champion < 0 or only_challenger < 0:
        raise ValueError(
            f"discordant counts must be >= 0, got {only_champion} and {only_challenger}"
        )
    champion = rng.random((trials, n)) < accuracy
    challenger = champion.copy()
    for t in range(trials):
        right, wrong = np.flatnonzero(champion[t]), np.flatnonzero(~champion[t])
        if right.size < only_champion or wrong.size < only_challenger:
            raise ValueError(
                f"trial {t}: champion has {right.size} right / {wrong.size} wrong rows, cannot "
                f"break {only_champion} and fix {only_challenger}"
            )
        challenger[t, rng.choice(right, only_champion, replace=False)] = False
        challenger[t, rng.choice(wrong, only_challenger, replace=False)] = True
    return champion, challenger


def noninferiority_power(
    *, effect: float, discordance: float, n: int, margin: float, confidence: float
) -> float:
    """Normal approximation of P(LCB > −margin) for a paired accuracy difference.

    Φ((δ + margin)/SE − z_confidence) with SE = sqrt((d − δ²)/n); margin 0 is superiority.
    """
    se = ((discordance - effect**2) / n) ** 0.5
    normal = NormalDist()
    return normal.cdf((effect + margin) / se - normal.inv_cdf(confidence))


@dataclass(frozen=True)
class Scenario:
    """True state of one gate: set sizes, true effects and churns (fractions, 0.01 = 1 point).

    The churn is the discordance of a successor with no net effect; a true effect δ adds |δ| of
    one-sided changes, so the discordance is churn + |δ| (b = churn/2 + max(−δ, 0),
    c = churn/2 + max(δ, 0)). This keeps every effect feasible at every churn and makes a large
    effect come with more disagreement, as it does between a model and its fine-tuned successor.
    """

    n_new: int
    n_retention: int
    new_effect: float
    retention_effect: float
    new_churn: float
    retention_churn: float
    new_accuracy: float = 0.80
    retention_accuracy: float = 0.90


class Trial(NamedTuple):
    """One simulated gate: per-example correctness of both models on both sets."""

    champion_new: np.ndarray
    challenger_new: np.ndarray
    champion_retention: np.ndarray
    challenger_retention: np.ndarray


def simulate(scenario: Scenario, *, trials: int, seed: int) -> list[Trial]:
    """`trials` independent draws of the scenario (generation vectorised over trials)."""
    rng = np.random.default_rng(seed)
    new = paired_correctness(
        rng,
        trials=trials,
        n=scenario.n_new,
        accuracy=scenario.new_accuracy,
        discordance=scenario.new_churn + abs(scenario.new_effect),
        effect=scenario.new_effect,
    )
    retained = paired_correctness(
        rng,
        trials=trials,
        n=scenario.n_retention,
        accuracy=scenario.retention_accuracy,
        discordance=scenario.retention_churn + abs(scenario.retention_effect),
        effect=scenario.retention_effect,
    )
    return [Trial(new[0][t], new[1][t], retained[0][t], retained[1][t]) for t in range(trials)]


Rule = Callable[[Trial], bool]


def gate_rule(policy: GatePolicy, *, references: bool = False) -> Rule:
    """`decide` under `policy` as a rule over one trial.

    Args:
        references: False: the per-step tests only (no batch ids, no references). True: the
            product's rule: the retention rows form one batch (``"b0"``) whose fixed reference is
            the champion's OBSERVED accuracy on them in that trial, so the forgetting budget is
            applied to the point estimate of the loss against the current champion. This is the
            first promotion after the batch was learned (reference = the champion that learned
            it), the most lenient situation for the budget; later in a lineage the reference is
            older and the accumulated loss is counted too.
    """
    groups: dict[int, np.ndarray] = {}

    def rule(trial: Trial) -> bool:
        retention_groups: np.ndarray | None = None
        batch_references: dict[str, float] | None = None
        if references:
            n = trial.champion_retention.size
            if n not in groups:
                groups[n] = np.full(n, "b0")
            retention_groups = groups[n]
            batch_references = {"b0": float(np.mean(trial.champion_retention))}
        return decide(
            challenger_new_correct=trial.challenger_new,
            champion_new_correct=trial.champion_new,
            challenger_retention_correct=trial.challenger_retention,
            champion_retention_correct=trial.champion_retention,
            retention_groups=retention_groups,
            references=batch_references,
            policy=policy,
        ).promote

    return rule


def promotion_rates(
    scenario: Scenario, rules: Mapping[str, Rule], *, trials: int, seed: int
) -> dict[str, float]:
    """Share of `trials` draws of `scenario` that each rule promotes (same draws for all)."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    draws = simulate(scenario, trials=trials, seed=seed)
    return {name: float(np.mean([rule(trial) for trial in draws])) for name, rule in rules.items()}
