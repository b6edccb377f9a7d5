"""Paired tests and the promotion decision (pure functions, no server)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from continual.gate_policy import GatePolicy, rebased_references
from continual.gate_power import (
    Scenario,
    gate_rule,
    noninferiority_power,
    paired_correctness,
    promotion_rates,
)
from continual.gating import accuracy_by_batch, decide
from continual.paired_tests import (
    MCNEMAR_CHI2,
    MCNEMAR_EXACT,
    mcnemar_test,
    minimum_detectable_effect,
    newcombe_paired_ci,
    paired_bootstrap,
    paired_se,
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


def _decide(new, retained=None, **kwargs):
    """decide() on (champion, challenger) pairs of the new-data and, optionally, retention set."""
    if retained is not None:
        kwargs |= {
            "champion_retention_correct": retained[0],
            "challenger_retention_correct": retained[1],
        }
    return decide(champion_new_correct=new[0], challenger_new_correct=new[1], **kwargs)


def _z(q: float) -> float:
    return float(stats.norm.ppf(q))


CLEAR_GAIN = _pairs(only_champion=5, only_challenger=105, both=780, neither=110)  # +10 pts, n=1000


def _reason(decision, start: str) -> str:
    """The one reason that starts with `start` ("retention accuracy", "The new-data check", ...)."""
    (reason,) = [r for r in decision.reasons if r.startswith(start)]
    return reason


def test_identical_models_are_promoted() -> None:
    rng = np.random.default_rng(3)
    new, retained = rng.random(400) < 0.9, rng.random(600) < 0.85
    decision = _decide((new, new), (retained, retained))
    assert decision.promote and decision.negative_flip_rate == 0.0
    new_reason, new_note, retention_reason = decision.reasons
    assert new_reason.endswith("— non-inferior.") and retention_reason.endswith("— non-inferior.")
    assert "n=400 < min_examples 500" in new_note and decision.underpowered


def test_clear_forgetting_on_retention_is_rejected_with_a_retention_reason() -> None:
    rng = np.random.default_rng(4)
    new = _model_pair(rng, 600, 0.80, 0.02, 0.30)  # better on new data
    old_champion, old_challenger = _model_pair(rng, 600, 0.90, 0.10, 0.05)  # forgets
    decision = _decide(new, (old_champion, old_challenger))
    assert not decision.promote
    assert _reason(decision, "new-data accuracy rose").endswith("— non-inferior.")
    retention_reason = _reason(decision, "retention accuracy fell")
    assert "≤ −5.0-pt tolerance, n=600, MDE" in retention_reason
    assert retention_reason.endswith("not shown non-inferior: rejected.")
    assert decision.negative_flip_rate == pytest.approx(np.mean(old_champion & ~old_challenger))


@pytest.mark.parametrize(
    ("only_champion", "only_challenger", "both", "neither"),
    [(15, 0, 435, 50), (45, 30, 405, 20)],  # both lose exactly 3 pts of 500; the second churns
)
def test_a_three_point_retention_loss_at_n_500_is_rejected(
    only_champion, only_challenger, both, neither
) -> None:
    """The issue's example: a challenger that certainly loses 3 pts of retention. The per-step
    evidence margin (5 pts) alone would let it through; the fixed-reference budget (2.5 pts of
    what the batch's first champion reached) does not."""
    champion, challenger = _pairs(only_champion, only_challenger, both, neither)
    decision = _decide(
        CLEAR_GAIN,
        (champion, challenger),
        retention_groups=["batch-1"] * 500,
        references={"batch-1": float(champion.mean())},
    )
    test = decision.retention
    assert test is not None and test.n == 500 and test.diff == pytest.approx(-0.03)
    assert not decision.promote
    assert decision.forgetting == pytest.approx(0.03)
    assert _reason(decision, "cumulative forgetting +3.0 pts").endswith("rejected.")


def test_beyond_tolerance_but_not_significant_is_now_rejected() -> None:
    # The churning 3-pt loss of 500 with a 2-pt tolerance: not significant (p ≈ 0.11), 95% CI
    # reaches above −2 pts — the old rule called it noise and promoted it.
    retained = _pairs(only_champion=45, only_challenger=30, both=405, neither=20)
    decision = _decide(CLEAR_GAIN, retained, policy=GatePolicy(retention_tolerance=0.02))
    test = decision.retention
    assert test is not None and test.p_value > 0.05
    assert newcombe_paired_ci(405, 30, 45, 20, 0.95)[1] > -0.02  # the old rule's rule (b) passed
    assert not decision.promote
    assert _reason(decision, "retention").endswith("not shown non-inferior: rejected.")


def test_short_validation_set_with_one_example_lost_is_rejected_and_underpowered() -> None:
    champion, challenger = _pairs(only_champion=1, only_challenger=0, both=26, neither=3)
    decision = _decide((champion, challenger))
    assert decision.new_data is not None and decision.new_data.p_value == 1.0
    assert not decision.promote and decision.underpowered
    assert decision.reasons[0].endswith("not shown non-inferior: rejected.")
    assert "n=30 < min_examples 500" in decision.reasons[1]
    assert "even an unchanged challenger passes it less than 80% of the time" in decision.reasons[1]


def test_large_drop_on_a_short_set_is_rejected() -> None:
    champion, challenger = _pairs(only_champion=4, only_challenger=0, both=6, neither=0)
    decision = _decide((champion, challenger))
    assert not decision.promote and "fell 40.0 pts" in decision.reasons[0]


def test_the_bound_is_the_lower_end_of_the_two_sided_interval_at_1_minus_2_alpha() -> None:
    champion, challenger = _pairs(only_champion=120, only_challenger=70, both=1600, neither=210)
    for confidence, promote in ((0.95, True), (0.975, False)):
        policy = GatePolicy(new_data_tolerance=0.037, confidence=confidence)
        decision = _decide((champion, challenger), policy=policy)
        low, high = newcombe_paired_ci(1600, 70, 120, 210, confidence=2 * confidence - 1)
        assert decision.to_metrics()["gate.new.lcb"] == pytest.approx(low)
        assert decision.new_data is not None and decision.new_data.ci_high == pytest.approx(high)
        assert decision.promote is promote
    # 90% interval: −3.64 … −1.37 pts; 95%: −3.86 … −1.15 pts
    assert "97.5% lower bound −3.9 pts ≤ −3.7-pt tolerance, n=2000" in decision.reasons[0]


def test_superior_rule_needs_the_bound_above_zero() -> None:
    small_gain = _pairs(only_champion=20, only_challenger=30, both=480, neither=70)  # +1.7 pts
    superior = GatePolicy(new_data_rule="superior")
    assert _decide(small_gain).promote
    rejected = _decide(small_gain, policy=superior)
    assert not rejected.promote and rejected.new_data is not None
    assert rejected.new_data.ci_low < 0 < rejected.new_data.diff
    assert rejected.reasons[0].endswith("≤ 0, n=600, MDE 2.9 pts) — not shown superior: rejected.")
    accepted = _decide(CLEAR_GAIN, policy=superior)
    assert accepted.promote and accepted.reasons[0].endswith("— superior.")


def test_minimum_detectable_effect_matches_the_formula_by_hand() -> None:
    b, c, n = 30, 10, 2000
    retained = _pairs(only_champion=b, only_challenger=c, both=1750, neither=210)
    decision = _decide(CLEAR_GAIN, retained)
    se = np.sqrt((b + c) / n - ((c - b) / n) ** 2) / np.sqrt(n)
    expected = (_z(0.95) + _z(0.80)) * se
    assert paired_se(b, c, n) == pytest.approx(se, rel=1e-12)
    assert decision.retention_mde == pytest.approx(expected, rel=1e-9)
    assert decision.to_metrics()["gate.retention.mde"] == pytest.approx(expected, rel=1e-9)
    assert f"MDE {expected * 100:.1f} pts)" in _reason(decision, "retention accuracy fell")
    assert minimum_detectable_effect(se, confidence=0.9, power=0.5) == pytest.approx(_z(0.9) * se)


def test_zero_discordance_is_floored_at_three_pairs() -> None:
    same = np.r_[np.ones(450, bool), np.zeros(50, bool)]
    decision = _decide(CLEAR_GAIN, (same, same))
    assert decision.retention is not None and decision.retention.se == pytest.approx(
        np.sqrt(3 / 500) / np.sqrt(500)
    )
    assert decision.retention_mde == pytest.approx((_z(0.95) + _z(0.8)) * np.sqrt(3) / 500)
    assert paired_se(1, 0, 100) == pytest.approx(np.sqrt(3 / 100 - 1e-4) / 10)


def test_underpowered_when_the_mde_exceeds_the_tolerance_even_with_enough_examples() -> None:
    churning = _pairs(only_champion=100, only_challenger=100, both=360, neither=40)  # n=600
    decision = _decide(CLEAR_GAIN, churning, policy=GatePolicy(min_examples=100))
    assert decision.retention_mde is not None and decision.retention_mde > 0.05
    assert decision.promote and decision.underpowered  # reported, never blocking
    note = _reason(decision, "The retention check is underpowered (MDE 5.9 pts > 5.0-pt tolerance")
    assert note.endswith("this alone does not block.")
    assert decision.to_metrics()["gate.underpowered"] == 1.0
    quiet = _decide(CLEAR_GAIN, _pairs(10, 10, 880, 100), policy=GatePolicy(min_examples=100))
    assert not quiet.underpowered and quiet.to_metrics()["gate.underpowered"] == 0.0


def test_an_underpowered_check_that_fails_without_a_loss_says_more_rows_decide_it() -> None:
    """Eleven gate rows, challenger as good as the champion: rejected, and the note says it is
    the evidence that is missing (what a user with small batches can change), not accuracy."""
    same = np.r_[np.ones(10, bool), np.zeros(1, bool)]
    decision = _decide((same, same), (np.ones(40, bool), np.ones(40, bool)))
    assert not decision.promote
    note = _reason(decision, "The new-data check is underpowered (n=11 < min_examples 500")
    assert "failed for want of evidence, not on an observed loss" in note
    assert "data.gate_fraction" in note and "does not block" not in note


def _batches(accuracies: dict[str, tuple[int, int, int]]):
    """Retention (champion, challenger, groups): per batch (rows, champion-only, both right)."""
    champion, challenger, groups = [], [], []
    for batch, (rows, only_champion, both) in accuracies.items():
        old, new = _pairs(only_champion, 0, both, rows - only_champion - both)
        champion.append(old)
        challenger.append(new)
        groups += [batch] * rows
    return np.concatenate(champion), np.concatenate(challenger), groups


def test_forgetting_budget_bounds_the_loss_against_fixed_references() -> None:
    # The challenger loses 1 pt vs the current champion (non-inferior: well within 5 pts), but
    # earlier promotions already lost some: the references do not move.
    champion, challenger, groups = _batches({"b1": (1000, 10, 880), "b2": (1000, 10, 880)})
    cases = [
        ({"b1": 0.90, "b2": 0.90}, True, 0.02),  # 2 pts accumulated: within the 2.5-pt budget
        ({"b1": 0.89, "b2": 0.87}, True, 0.0),  # b2 improved since its reference: nets out
        ({"b1": 0.93, "b2": 0.91}, False, 0.04),  # 4 pts accumulated: beyond it
    ]
    for references, promote, forgetting in cases:
        decision = _decide(
            CLEAR_GAIN, (champion, challenger), retention_groups=groups, references=references
        )
        assert decision.retention is not None and decision.retention.diff == pytest.approx(-0.01)
        assert decision.retention.ci_low > -0.035  # the per-step check alone would promote
        assert decision.promote is promote
        assert decision.forgetting == pytest.approx(forgetting, abs=1e-12)
        assert decision.retention_by_batch == {"b1": pytest.approx(0.88), "b2": pytest.approx(0.88)}
        verdict = "within the 2.5-pt budget." if promote else "beyond the 2.5-pt budget: rejected."
        assert any(verdict in reason for reason in decision.reasons)
        assert decision.to_metrics()["gate.forgetting"] == pytest.approx(forgetting, abs=1e-12)


def test_forgetting_is_weighted_by_rows_and_skips_batches_without_a_reference() -> None:
    champion, challenger, groups = _batches(
        {"b1": (200, 2, 170), "b2": (800, 8, 720), "b3": (300, 3, 270)}
    )
    references = {"b1": 0.95, "b2": 0.90, "gone": 0.99}
    decision = _decide(
        CLEAR_GAIN, (champion, challenger), retention_groups=groups, references=references
    )
    # (200·(0.95 − 0.85) + 800·(0.90 − 0.90)) / 1000 = 2 pts; the unweighted mean would be 5 pts.
    assert decision.forgetting == pytest.approx(0.02)
    assert decision.promote
    assert decision.retention_by_batch == pytest.approx({"b1": 0.85, "b2": 0.90, "b3": 0.90})
    reason = decision.reasons[-1]
    assert reason.startswith("cumulative forgetting +2.0 pts against the fixed references of 2 ")
    assert "largest loss: batch 'b1' 0.950 → 0.850" in reason
    assert reason.endswith("Batches without a reference, not counted: b3.")


def test_forgetting_budget_applies_without_champion_retention_scores() -> None:
    _, challenger, groups = _batches({"b1": (500, 0, 430)})  # challenger 0.86
    decision = decide(
        challenger_new_correct=CLEAR_GAIN[1],
        champion_new_correct=CLEAR_GAIN[0],
        challenger_retention_correct=challenger,
        retention_groups=groups,
        references={"b1": 0.92},
    )
    assert decision.retention is None and decision.forgetting == pytest.approx(0.06)
    assert not decision.promote
    assert "retention was not compared" in decision.reasons[-1]


def test_batch_accuracies_without_references_and_for_the_first_champion() -> None:
    _, challenger, groups = _batches({"a": (100, 0, 90), "b": (50, 0, 40)})
    decision = _decide(CLEAR_GAIN, (challenger, challenger), retention_groups=groups)
    assert decision.promote and decision.forgetting is None
    assert decision.retention_by_batch == pytest.approx({"a": 0.9, "b": 0.8})
    assert "cumulative forgetting was not checked" in decision.reasons[-1]
    first = decide(
        challenger_new_correct=CLEAR_GAIN[1],
        challenger_retention_correct=challenger,
        retention_groups=np.array(groups),
    )
    assert first.promote and first.retention_by_batch == pytest.approx({"a": 0.9, "b": 0.8})
    assert accuracy_by_batch(challenger, groups) == {"a": (0.9, 100), "b": (0.8, 50)}


def test_no_champion_uses_the_accuracy_floor() -> None:
    correct = np.array([1] * 7 + [0] * 3)
    policy = GatePolicy(min_accuracy=0.7)
    assert decide(challenger_new_correct=correct, policy=policy).promote
    rejected = decide(challenger_new_correct=correct[1:], policy=policy)
    assert not rejected.promote and "below the 0.700 floor" in rejected.reasons[0]
    assert "new-data accuracy 0.667" in rejected.reasons[0]
    assert rejected.new_data is None and rejected.negative_flip_rate is None
    named = decide(challenger_new_correct=correct, policy=policy, floor_score="share of rows")
    assert "new-data share of rows 0.700 meets" in named.reasons[0]


def test_decision_exports_flat_metrics_and_json() -> None:
    rng = np.random.default_rng(5)
    champion, challenger = _model_pair(rng, 300, 0.85, 0.05, 0.2)
    groups = ["b1"] * 150 + ["b2"] * 150
    decision = _decide(
        (champion, challenger),
        (champion, challenger),
        retention_groups=groups,
        references={"b1": 0.9},
    )
    metrics = decision.to_metrics()
    assert metrics["gate.promote"] == float(decision.promote)
    keys = ["gate.new.diff", "gate.new.ci_low", "gate.retention.p_value", "gate.new.n"]
    keys += ["gate.new.lcb", "gate.retention.lcb", "gate.new.mde", "gate.retention.mde"]
    keys += ["gate.forgetting", "gate.underpowered"]
    for key in keys:
        assert isinstance(metrics[key], float), key
    assert all(isinstance(value, float) for value in metrics.values())
    record = json.loads(json.dumps(decision.to_dict()))
    assert record["reasons"] == list(decision.reasons) and record["policy"]["confidence"] == 0.95
    assert record["retention_by_batch"].keys() == {"b1", "b2"} and record["underpowered"] is True
    assert record["policy"]["new_data_rule"] == "non_inferior"


def test_continuous_scores_go_through_the_paired_bootstrap() -> None:
    rng = np.random.default_rng(6)
    champion = rng.random(200)
    decision = decide(challenger_new_correct=champion - 0.2, champion_new_correct=champion)
    assert decision.new_data is not None and decision.new_data.method == "paired bootstrap"
    assert not decision.promote
    # in the score's own unit (a causal LM's: nats), not in accuracy points
    assert "mean score fell 0.200 (" in decision.reasons[0]
    assert "≤ −0.050 tolerance" in decision.reasons[0]
    assert not any("pts" in reason for reason in decision.reasons)
    # identical differences: the SE is floored at three examples moving across the score range
    spread = max(champion.max(), (champion - 0.2).max()) - min(champion.min(), champion.min() - 0.2)
    assert decision.new_data.se == pytest.approx(np.sqrt(3 * spread**2 / 200) / np.sqrt(200))
    noisy = decide(
        challenger_new_correct=champion + 0.01 * rng.standard_normal(200),
        champion_new_correct=champion,
    )
    assert noisy.promote and noisy.new_data is not None and noisy.new_data.ci_low > -0.03


def test_inconsistent_arguments_are_refused() -> None:
    ok = np.ones(10, bool)
    with pytest.raises(ValueError, match="challenger_retention_correct"):
        decide(challenger_new_correct=ok, champion_new_correct=ok, champion_retention_correct=ok)
    with pytest.raises(ValueError, match="same examples"):
        decide(challenger_new_correct=ok, champion_new_correct=ok[:5])
    with pytest.raises(ValueError, match="non-empty"):
        decide(challenger_new_correct=[])
    both = {"challenger_retention_correct": ok, "champion_retention_correct": ok}
    with pytest.raises(ValueError, match="9 batch ids but the retention set has 10"):
        _decide((ok, ok), (ok, ok), retention_groups=["a"] * 9)
    with pytest.raises(ValueError, match="without retention_groups"):
        decide(challenger_new_correct=ok, champion_new_correct=ok, references={"a": 0.9}, **both)
    with pytest.raises(ValueError, match="retention_groups was given without"):
        decide(challenger_new_correct=ok, champion_new_correct=ok, retention_groups=["a"] * 10)
    with pytest.raises(ValueError, match=r"references\['a'\] must be a finite"):
        _decide((ok, ok), (ok, ok), retention_groups=["a"] * 10, references={"a": float("nan")})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("new_data_tolerance", -0.01, "new_data_tolerance must be in"),
        ("retention_tolerance", 2.0, "retention_tolerance must be in"),
        ("forgetting_budget", -1.0, "forgetting_budget must be in"),
        ("confidence", 0.5, "one-sided level"),
        ("confidence", 1.0, "one-sided level"),
        ("new_data_rule", "better", "new_data_rule must be one of"),
        ("min_examples", 0, "min_examples must be >= 1"),
        ("min_accuracy", 1.5, "min_accuracy must be in"),
        ("n_bootstrap", 0, "n_bootstrap must be >= 1"),
    ],
)
def test_policy_is_validated_with_a_clear_message(field, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        GatePolicy(**{field: value})


def test_generator_realises_the_requested_paired_table() -> None:
    rng = np.random.default_rng(7)
    champion, challenger = paired_correctness(
        rng, trials=20, n=5000, accuracy=0.9, discordance=0.08, effect=-0.02
    )
    only_champion = (champion & ~challenger).mean()
    only_challenger = (~champion & challenger).mean()
    assert champion.mean() == pytest.approx(0.9, abs=0.003)
    assert only_champion == pytest.approx(0.05, abs=0.002)  # (d − δ)/2
    assert only_challenger == pytest.approx(0.03, abs=0.002)  # (d + δ)/2
    with pytest.raises(ValueError, match="discordance must be in"):
        paired_correctness(rng, trials=1, n=10, accuracy=0.9, discordance=0.01, effect=-0.02)


def test_operating_characteristics_meet_both_targets_at_the_defaults() -> None:
    # Churn 0.05 on both sets, n_new = 200, n_retention = 500, new data +5 pts (module
    # continual.gate_power); tolerance + 1 pt of true retention loss must be caught.
    policy = GatePolicy()
    rules = {"gate": gate_rule(policy)}

    def rate(retention_effect: float, seed: int) -> float:
        scenario = Scenario(200, 500, 0.05, retention_effect, new_churn=0.05, retention_churn=0.05)
        return promotion_rates(scenario, rules, trials=1500, seed=seed)["gate"]

    assert rate(-(policy.retention_tolerance + 0.01), seed=1) <= 0.05
    power = rate(0.0, seed=2)
    assert power >= 0.80
    # and matches the normal approximation: the product of the two checks' pass rates
    approx = noninferiority_power(
        effect=0.05, discordance=0.10, n=200, margin=policy.new_data_tolerance, confidence=0.95
    ) * noninferiority_power(
        effect=0.0, discordance=0.05, n=500, margin=policy.retention_tolerance, confidence=0.95
    )
    assert power == pytest.approx(approx, abs=0.03)


def _correct(n: int, right: int) -> np.ndarray:
    return np.array([1] * right + [0] * (n - right))


def test_a_proven_large_gain_may_buy_a_bounded_retention_loss():
    """Class arrival: 0 → 95 % on the new classes, 2.9 pts lost on the old ones (n=136, LCB
    below −5 pts): rejected by 2b alone, promoted by the exchange; a 6.3-pt loss is not."""
    champion_new, challenger_new = np.zeros(60), _correct(60, 57)
    champion_old = _correct(136, 134)
    small_loss = champion_old.copy()
    small_loss[:4] = 0  # 4 of 136 ≈ 2.9 pts
    strict = GatePolicy(exchange_gain=None)
    args = dict(challenger_new_correct=challenger_new, champion_new_correct=champion_new)
    rejected = decide(
        **args,
        challenger_retention_correct=small_loss,
        champion_retention_correct=champion_old,
        policy=strict,
    )
    assert not rejected.promote
    traded = decide(
        **args, challenger_retention_correct=small_loss, champion_retention_correct=champion_old
    )
    assert traded.promote and "promoted by exchange" in traded.reasons[0]  # the deciding rule
    assert traded.exchanged and not rejected.exchanged
    big_loss = champion_old.copy()
    big_loss[:15] = 0  # ≈ 11 pts > exchange_max_loss
    refused = decide(
        **args, challenger_retention_correct=big_loss, champion_retention_correct=champion_old
    )
    assert not refused.promote and "no exchange" in refused.reasons[-1]
    assert not refused.exchanged


def test_an_exchange_needs_a_proven_net_gain_on_every_held_out_row():
    """Overlapping classes: a new class learned (0 → 95 % on 60 rows) for 8 pts of old accuracy
    is a net gain on 196 held-out rows (traded), but not on 2,060 (the new class's 57 rows
    cannot pay for 160 old ones): refused, though the loss is within exchange_max_loss."""
    args = dict(challenger_new_correct=_correct(60, 57), champion_new_correct=np.zeros(60))
    for n_old, promoted in ((136, True), (2000, False)):
        champion_old = np.ones(n_old)
        challenger_old = champion_old.copy()
        challenger_old[: round(0.08 * n_old)] = 0
        decision = decide(
            **args,
            challenger_retention_correct=challenger_old,
            champion_retention_correct=champion_old,
        )
        assert decision.promote is promoted and decision.exchanged is promoted
        exchange = next(r for r in decision.reasons if r.startswith("exchange:"))
        assert f"net change on all {60 + n_old} held-out rows" in exchange
        assert ("≤ 0 — no exchange" in exchange) is not promoted


def test_after_an_exchange_the_traded_loss_is_not_charged_again():
    """References fall to what the exchanged challenger keeps (never rise); without an exchange
    they stay fixed, so unexplained losses still add up."""
    champion_old = np.ones(100)
    kept = champion_old.copy()
    kept[:8] = 0
    decision = decide(
        challenger_new_correct=_correct(60, 57),
        champion_new_correct=np.zeros(60),
        challenger_retention_correct=np.concatenate([kept, np.ones(50)]),
        champion_retention_correct=np.concatenate([champion_old, np.ones(50)]),
        retention_groups=["a"] * 100 + ["b"] * 50,
        references={"a": 0.99, "b": 0.9},
    )
    assert decision.exchanged
    assert rebased_references({"a": 0.99, "b": 0.9, "c": 0.7}, decision) == pytest.approx(
        {"a": 0.92, "b": 0.9, "c": 0.7}
    )
    plain = _decide(CLEAR_GAIN, CLEAR_GAIN)
    assert not plain.exchanged and rebased_references({"a": 0.99}, plain) == {"a": 0.99}


def test_no_exchange_without_a_proven_large_gain():
    """+5 pts on new data (the gate benchmark's case) never buys a retention loss."""
    n = 400
    champion_new, challenger_new = _correct(n, 320), _correct(n, 340)
    champion_old = _correct(136, 134)
    worse = champion_old.copy()
    worse[:4] = 0
    decision = decide(
        challenger_new_correct=challenger_new,
        champion_new_correct=champion_new,
        challenger_retention_correct=worse,
        champion_retention_correct=champion_old,
    )
    assert not decision.promote and "no exchange" in decision.reasons[-1]


def _old_batch(n: int, lost: int) -> dict[str, object]:
    """Retention of one earlier batch whose reference is 1.0: the champion right on all n rows,
    the challenger wrong on `lost` of them."""
    challenger = np.ones(n)
    challenger[:lost] = 0
    return {
        "champion_retention_correct": np.ones(n),
        "challenger_retention_correct": challenger,
        "retention_groups": ["b0"] * n,
        "references": {"b0": 1.0},
    }


def test_a_budget_finer_than_one_row_is_one_row():
    """14 retention rows (wine): one changed old prediction is 7.1 pts, beyond the 2.5-pt budget
    and the 5-pt exchange cap, so every update that learned a new class was rejected, forever."""
    new = {"champion_new_correct": np.arange(13) < 3, "challenger_new_correct": np.ones(13)}
    one = decide(**new, **_old_batch(14, 1))
    assert one.promote and one.reasons[0].startswith("exchange:")
    assert any("(one row of 14: 7.1 pts)." in r for r in one.reasons)
    two = decide(**new, **_old_batch(14, 2))
    assert not two.promote  # two rows are a loss, not one row's noise


def test_the_one_row_floor_leaves_large_sets_and_other_scores_alone():
    new = {"champion_new_correct": np.ones(400), "challenger_new_correct": np.ones(400)}
    large = decide(**new, **_old_batch(500, 15))  # 3 pts > the 2.5-pt budget; one row is 0.2
    assert not large.promote and large.forgetting == pytest.approx(0.03)
    scores = {"champion_new_correct": np.zeros(14), "challenger_new_correct": np.zeros(14)}
    nats = _old_batch(14, 1)  # log-likelihoods: 0 and 1 here are not "rows right"
    nats["challenger_retention_correct"] = np.full(14, 1.0 - 1 / 14)
    assert not decide(**scores, **nats).promote


def test_log_likelihood_reasons_speak_in_the_scores_unit() -> None:
    """Per-row log-likelihoods (a causal LM's gate): the retention, forgetting and exchange lines
    give differences as scores (nats), never as accuracy points."""
    rng = np.random.default_rng(3)
    new = rng.normal(-3.0, 0.3, 300)
    old = rng.normal(-3.2, 0.3, 300)
    decision = decide(
        challenger_new_correct=new + 0.3,
        champion_new_correct=new,
        challenger_retention_correct=old - 0.04,
        champion_retention_correct=old,
        retention_groups=["b1"] * 300,
        references={"b1": float(old.mean())},
    )
    text = " ".join(decision.reasons)
    assert "pts" not in text and "-pt" not in text
    assert "cumulative forgetting +0.040 against" in text
    assert "retention mean score fell 0.040 (" in text
    assert "exchange: new-data gain lower bound +0.300 ≥ 0.100, retention given up 0.040" in text
