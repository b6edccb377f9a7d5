"""Drift: PSI against a hand computation; KS + PSI flag a shifted feature and not the others."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_plane.drift import drift_report, population_stability_index
from tests.fixtures_data import make_batch


def test_psi_matches_a_hand_computation() -> None:
    reference = np.array([0.0, 1.0, 2.0, 3.0] * 25)  # quartile edges at 0.75, 1.5, 2.25
    current = np.array([0.0] * 10 + [1.0] * 20 + [2.0] * 30 + [3.0] * 40)
    r, c = np.full(4, 0.25), np.array([0.1, 0.2, 0.3, 0.4])
    expected = float(np.sum((c - r) * np.log(c / r)))
    assert population_stability_index(reference, current, bins=4) == pytest.approx(expected)
    assert population_stability_index(reference, reference, bins=4) == pytest.approx(0.0)


def test_psi_handles_constants_empty_bins_and_non_finite_values() -> None:
    constant = np.full(100, 5.0)
    assert population_stability_index(constant, constant) == pytest.approx(0.0)
    moved = np.full(100, 9.0)
    assert population_stability_index(constant, moved) > 5.0  # all mass in an empty bin
    noisy = np.array([1.0, 2.0, np.nan, np.inf, 3.0])
    assert np.isfinite(population_stability_index(noisy, noisy))
    with pytest.raises(ValueError, match="finite value"):
        population_stability_index(np.array([np.nan]), constant)


def test_drift_report_flags_the_shifted_feature_only() -> None:
    reference = make_batch(2000, 8, seed=1)
    current = make_batch(1500, 8, seed=2, shift=1.0)  # f0 moves by one standard deviation
    report = drift_report(reference, current, [f"f{i}" for i in range(8)])
    by_name = {f.feature: f for f in report.features}
    assert by_name["f0"].drifted and by_name["f0"].psi > 0.5 and by_name["f0"].ks_pvalue < 1e-10
    assert report.n_drifted == 1 and report.max_psi == by_name["f0"].psi
    assert all(f.psi < 0.05 for name, f in by_name.items() if name != "f0")
    assert (report.n_reference, report.n_current) == (2000, 1500)
    summary = report.summary(top_k=3)
    rows = [
        line for line in summary.splitlines() if line.startswith("| f") and "feature" not in line
    ]
    assert "1 of 8 features drifted" in summary and len(rows) == 3 and rows[0].startswith("| f0 |")
    assert report.to_dict()["features"][0]["feature"] == "f0"


def test_no_false_alarms_across_many_unshifted_features() -> None:
    """Bonferroni: 60 identically distributed features, no drift expected."""
    rng = np.random.default_rng(0)
    names = [f"x{i}" for i in range(60)]
    reference = pd.DataFrame(rng.normal(size=(800, 60)), columns=names)
    current = pd.DataFrame(rng.normal(size=(800, 60)), columns=names)
    assert drift_report(reference, current, names).n_drifted == 0


def test_small_shifts_in_large_batches_need_psi_too() -> None:
    """KS alone fires on a 0.1-sd shift with 50k rows; PSI says the change is immaterial."""
    rng = np.random.default_rng(1)
    reference = pd.DataFrame({"a": rng.normal(size=50_000)})
    current = pd.DataFrame({"a": rng.normal(0.1, 1.0, size=50_000)})
    feature = drift_report(reference, current, ["a"]).features[0]
    assert feature.ks_pvalue < 1e-6 and feature.psi < 0.2 and not feature.drifted


def test_drift_report_errors_and_empty_features() -> None:
    reference = pd.DataFrame({"a": [1.0, 2.0], "b": [np.nan, np.nan]})
    with pytest.raises(KeyError, match=r"\['c'\]"):
        drift_report(reference, reference, ["a", "c"])
    report = drift_report(reference, reference, ["a", "b"])
    assert not report.features[1].drifted and np.isnan(report.features[1].psi)
    assert report.max_psi == pytest.approx(0.0)
