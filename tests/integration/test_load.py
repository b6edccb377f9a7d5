"""Load: monthly-finetune, weekly-replay, daily-lora and stream-monitor started at once on a real
Prefect server with a real process worker, round after round (benchmarks/bench_load.py).

CI runs `EVERGREEN_LOAD_ROUNDS` rounds (default 2); the full 20 rounds are
`python -m benchmarks.bench_load --rounds 20` (figures in benchmarks/results/load.md).
"""

from __future__ import annotations

import os

import pytest

from benchmarks.bench_load import run_load

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROUNDS = int(os.environ.get("EVERGREEN_LOAD_ROUNDS", "2"))


@pytest.fixture(scope="module")
def load(tmp_path_factory):
    return run_load(tmp_path_factory.mktemp("load"), ROUNDS, round_timeout=600)


def test_no_round_deadlocks_and_every_flow_run_completes(load):
    assert load.deadlocked is None, load.deadlocked
    assert len(load.rounds) == ROUNDS
    assert not load.failures, [e for r in load.rounds for e in r.errors] or load.failures
    for round_ in load.rounds:  # the four cadences ran in every round
        assert set(round_.states) == {
            "monthly-finetune",
            "weekly-replay",
            "daily-lora",
            "stream-monitor",
        }


def test_no_concurrency_slot_is_leaked(load):
    assert load.active_slots and not any(load.active_slots.values()), load.active_slots


def test_every_batch_is_processed_exactly_once_per_cadence(load):
    assert not load.not_exactly_once(), load.not_exactly_once()
