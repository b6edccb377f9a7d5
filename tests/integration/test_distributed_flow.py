"""weekly-replay with `weekly.train.processes: 2` (torchrun, 2 gloo ranks) against 1 process.

Two identical pipelines (same data, same bootstrap champion) differ only in the process count of
the weekly training; the 2-process challenger must pass the same gate as the 1-process one, with
gate accuracies within a few points (the ranks see other batch orders and replay rows).
"""

from __future__ import annotations

import pytest

from evergreen.cadences import run_flow
from tests.digits_pipeline import digits_frame, write_batch, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _pipeline(root, processes: int) -> dict:
    landing = root / "landing"
    write_batch(landing, "2026-01-01", digits_frame(slice(0, 700)))
    write_batch(landing, "2026-01-05", digits_frame(slice(700, 1100), shift=1))
    weekly = {"train": {"steps": 60, "processes": processes}, "ewc_lambda": 10.0}
    config = str(write_config(root, landing, root / "home", weekly=weekly))
    first = run_flow("bootstrap", config_path=config, batch_ids=["2026-01-01"])
    assert first["decision"] == "promoted", first
    return run_flow("weekly-replay", config_path=config, batch_ids=["2026-01-05"])


def test_two_process_weekly_replay_passes_the_same_gate(tmp_path):
    single = _pipeline(tmp_path / "one", 1)
    double = _pipeline(tmp_path / "two", 2)
    assert single["decision"] == "promoted", single
    assert double["decision"] == single["decision"], double["reasons"]
    for key in ("gate.new.challenger_accuracy", "gate.retention.challenger_accuracy"):
        if key in single["metrics"]:
            assert abs(double["metrics"][key] - single["metrics"][key]) < 0.05, key
