"""Paired tests and the promotion decision (pure functions, no server)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from continual.gating import (
    MCNEMAR_CHI2,
    MCNEMAR_EXACT,
    GatePolicy,
    decide,
    mcnemar_test,
    newcombe_paired_ci,
    paired_bootstrap,
)


def _pairs(only_champion: int, only_challenger: int, both: int, neither: int):
    """Per-example correctness arrays realising a paired 2×2 table."""
    champion = [1] * only_champion + [0] * only_challenger + [1] * both + [0] * neither
    challenger = [0] * only_champion + [1] * only_challenger + [1] * both + [0] * neither
    return np.array(champion, bool), np.array(challenger, bool)


@pytest.mark.parametrize(("b", "c"), [(0, 0), (3, 3), (1, 0), (2, 9), (12, 1), (0, 24)])
def test_mcnemar_exact_p_matches_scipy_binomtest(b, c) -> None:
    champion, challenger = _pairs(b, c, both=50, neither=7)
    result = mcnemar_test(champion, challenger)
    expected = 1.0 if b + c == 0 else stats.binomtest(min(b, c), b + c, 0.5).pvalue
    assert result.method == MCNEMAR_EXACT
    assert result.p_value == pytest.approx(expected, rel=1e-9)
    assert result.diff == pytest.approx((c - b) / (b + c + 57))


@pytest.mark.parametrize(("b", "c"), [(30, 12), (10, 15), (40, 41), (100, 60)])
def test_mcnemar_chi2_p_matches_the_formula_by_hand(b, c) -> None:
    champion, challenger = _pairs(b, c, both=300, neither=40)
    result = mcnemar_test(champion, challenger)
    statistic = max(abs(b - c) - 1, 0) ** 2 / (b + c)
    assert result.method == MCNEMAR_CHI2
    assert result.p_value == pytest.approx(stats.chi2.sf(statistic, df=1), rel=1e-12)


def test_newcombe_interval_matches_the_published_reference() -> None:
    # Cavo et al. 2012 table from Fagerland, Lydersen & Laake (2017), ch. 8, as computed by the
    # R package contingencytables: estimate −0.0621, 95% CI −0.1186 to −0.0046.
    low, high = newcombe_paired_ci(both=59, only_challenger=6, only_champion=16, neither=80)
    assert (round(low, 4), round(high, 4)) == (-0.1186, -0.0046)


def test_newcombe_interval_covers_the_true_difference() -> None:
    rng = np.random.default_rng(0)
    n, sims, p_champion, p_challenger = 120, 600, 0.85, 0.80
    truth, covered = _true_diff(p_champion, p_challenger), 0
    for _ in range(sims):
        latent = rng.random(n)  # shared difficulty makes the pair correlated
        champion = latent < p_champion
        challenger = (latent + 0.1 * rng.standard_normal(n)) < p_challenger
        result = mcnemar_test(champion, challenger)
        covered += result.ci_low <= truth <= result.ci_high
    assert 0.92 <= covered / sims <= 0.99


def _true_diff(p_champion: float, p_challenger: float) -> float:
    # P(latent + 0.1·N(0,1) < p) − P(latent < p) for latent ~ U(0,1), by quadrature.
    grid = np.linspace(0, 1, 20_001)
    return float(np.mean(stats.norm.cdf((p_challenger - grid) / 0.1)) - p_champion)


def test_paired_bootstrap_interval_covers_the_true_difference() -> None:
    rng = np.random.default_rng(1)
    n, sims, true_diff = 150, 300, 0.1
    covered = 0
    for seed in range(sims):
        champion = rng.normal(size=n)
        challenger = 0.7 * champion + 0.7 * rng.normal(size=n) + true_diff
        result = paired_bootstrap(champion, challenger, n_resamples=1000, seed=seed)
        covered += result.ci_low <= true_diff <= result.ci_high
    assert 0.90 <= covered / sims <= 0.99


def test_paired_bootstrap_p_value_and_degenerate_case() -> None:
    rng = np.random.default_rng(2)
    champion = rng.normal(size=300)
    shifted = paired_bootstrap(champion, champion + 0.5 + 0.1 * rng.normal(size=300))
    assert shifted.p_value < 0.01 and shifted.ci_low > 0.4
    null = paired_bootstrap(champion, champion + 0.3 * rng.normal(size=300), seed=3)
    assert null.p_value > 0.05 and null.ci_low < 0 < null.ci_high
    same = paired_bootstrap(champion, champion)
    assert (same.diff, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap(champion, champion[:-1])


def _model_pair(rng, n: int, accuracy: float, break_rate: float, fix_rate: float):
    """Champion correctness, and a challenger that breaks/fixes given shares of examples."""
    champion = rng.random(n) < accuracy
    flip = rng.random(n)
    challenger = np.where(champion, flip >= break_rate, flip < fix_rate)
    return champion, challenger


def test_identical_models_are_promoted() -> None:
    rng = np.random.default_rng(3)
    new, retained = rng.random(400) < 0.9, rng.random(600) < 0.85
    decision = decide(
        challenger_new_correct=new,
        champion_new_correct=new,
        challenger_retention_correct=retained,
        champion_retention_correct=retained,
    )
    assert decision.promote and decision.negative_flip_rate == 0.0
    assert all("within" in reason for reason in decision.reasons)


def test_clear_forgetting_on_retention_is_rejected_with_a_retention_reason() -> None:
    rng = np.random.default_rng(4)
    new_champion, new_challenger = _model_pair(rng, 400, 0.80, 0.02, 0.30)  # better on new data
    old_champion, old_challenger = _model_pair(rng, 600, 0.90, 0.10, 0.05)  # forgets
    decision = decide(
        challenger_new_correct=new_challenger,
        champion_new_correct=new_champion,
        challenger_retention_correct=old_challenger,
        champion_retention_correct=old_champion,
    )
    assert not decision.promote
    new_reason, retention_reason = decision.reasons
    assert new_reason.startswith("new-data accuracy rose") and "within" in new_reason
    assert retention_reason.startswith("retention accuracy fell")
    assert "2.0-pt tolerance" in retention_reason and "McNemar p=" in retention_reason
    assert decision.retention is not None and decision.retention.p_value < 0.001
    assert decision.negative_flip_rate == pytest.approx(np.mean(old_champion & ~old_challenger))


def test_significant_drop_beyond_tolerance_is_rejected_even_if_the_ci_overlaps_it() -> None:
    champion, challenger = _pairs(only_champion=120, only_challenger=70, both=1600, neither=210)
    decision = decide(
        challenger_new_correct=challenger,
        champion_new_correct=champion,
        policy=GatePolicy(new_data_tolerance=0.02),
    )
    assert decision.new_data is not None and decision.new_data.ci_high > -0.02
    assert not decision.promote and "significant (p < 0.05)" in decision.reasons[0]


def test_short_validation_set_with_one_example_difference_is_promoted() -> None:
    champion, challenger = _pairs(only_champion=1, only_challenger=0, both=26, neither=3)
    decision = decide(
        challenger_new_correct=challenger,
        champion_new_correct=champion,
        challenger_retention_correct=challenger,
        champion_retention_correct=champion,
    )
    assert decision.promote
    assert "not significant" in decision.reasons[0] and "treated as noise" in decision.reasons[0]


def test_large_drop_on_a_short_set_is_rejected_when_the_whole_ci_is_beyond_tolerance() -> None:
    champion, challenger = _pairs(only_champion=4, only_challenger=0, both=6, neither=0)
    decision = decide(challenger_new_correct=challenger, champion_new_correct=champion)
    test = decision.new_data
    assert test is not None and test.p_value > 0.05  # the exact test alone would let it pass
    assert test.ci_high < -0.01
    assert not decision.promote and "whole 95% interval" in decision.reasons[0]


def test_no_champion_uses_the_accuracy_floor() -> None:
    correct = np.array([1] * 7 + [0] * 3)
    policy = GatePolicy(min_accuracy=0.7)
    assert decide(challenger_new_correct=correct, policy=policy).promote
    rejected = decide(challenger_new_correct=correct[1:], policy=policy)
    assert not rejected.promote and "below the 0.700 floor" in rejected.reasons[0]
    assert rejected.new_data is None and rejected.negative_flip_rate is None


def test_decision_exports_flat_metrics_and_json() -> None:
    rng = np.random.default_rng(5)
    champion, challenger = _model_pair(rng, 300, 0.85, 0.05, 0.2)
    decision = decide(
        challenger_new_correct=challenger,
        champion_new_correct=champion,
        challenger_retention_correct=challenger,
        champion_retention_correct=champion,
    )
    metrics = decision.to_metrics()
    assert metrics["gate.promote"] == float(decision.promote)
    for key in ("gate.new.diff", "gate.new.ci_low", "gate.retention.p_value", "gate.new.n"):
        assert isinstance(metrics[key], float)
    record = json.loads(json.dumps(decision.to_dict()))
    assert record["reasons"] == list(decision.reasons) and record["policy"]["confidence"] == 0.95


def test_continuous_scores_go_through_the_paired_bootstrap() -> None:
    rng = np.random.default_rng(6)
    champion = rng.random(200)
    decision = decide(challenger_new_correct=champion - 0.2, champion_new_correct=champion)
    assert decision.new_data is not None and decision.new_data.method == "paired bootstrap"
    assert not decision.promote and "mean score fell 20.0 pts" in decision.reasons[0]


def test_inconsistent_arguments_are_refused() -> None:
    ok = np.ones(10, bool)
    with pytest.raises(ValueError, match="challenger_retention_correct"):
        decide(challenger_new_correct=ok, champion_new_correct=ok, champion_retention_correct=ok)
    with pytest.raises(ValueError, match="same examples"):
        decide(challenger_new_correct=ok, champion_new_correct=ok[:5])
    with pytest.raises(ValueError, match="non-empty"):
        decide(challenger_new_correct=[])
