"""The daily's select-row check as a screen (`tasks.train_lora.screened`): on a few dozen rows
an inconclusive check defers to the promotion gate unless the adapter scored worse; a powered
or passing check keeps its own verdict."""

from __future__ import annotations

import numpy as np

from continual.gate_policy import GatePolicy
from continual.gating import decide
from tasks.train_lora import screened


def _paired(n: int, champion_right: int, challenger_right: int) -> dict[str, np.ndarray]:
    """Correctness vectors of n rows: the champion right on the first `champion_right`, the
    challenger on the first `challenger_right` (so every discordant row goes one way)."""
    champion = np.arange(n) < champion_right
    challenger = np.arange(n) < challenger_right
    return {
        "champion_new_correct": champion.astype(float),
        "challenger_new_correct": challenger.astype(float),
    }


def test_an_underpowered_failure_with_a_gain_defers_to_the_gate() -> None:
    # 15 select rows, the adapter right on 12 where the champion was on 11: +6.7 pts, but the
    # lower bound is far below -5 pts — the v4 case of docs/TEXT.md
    check = decide(**_paired(15, 11, 12))
    assert not check.promote and check.underpowered
    kept = screened(check)
    assert kept.promote
    assert kept.reasons[: len(check.reasons)] == check.reasons  # the check's own lines stay
    assert kept.reasons[-1].startswith("The select rows cannot decide")
    assert "+6.7 pts" in kept.reasons[-1]


def test_an_underpowered_failure_that_scored_worse_is_discarded() -> None:
    check = decide(**_paired(20, 15, 14))
    assert not check.promote and check.underpowered
    discarded = screened(check)
    assert not discarded.promote
    assert discarded.reasons[-1] == "The adapter scored −5.0 pts on the select rows: discarded."


def test_an_unchanged_adapter_on_few_rows_is_kept_for_the_gate() -> None:
    check = decide(**_paired(12, 8, 8))
    assert screened(check).promote  # "no worse" is the screen's bar, the gate asks for more


def test_a_powered_failure_keeps_its_verdict() -> None:
    # 4,000 rows: MDE ≈ 1.4 pts; the adapter loses 8 pts
    check = decide(**_paired(4000, 3600, 3280))
    assert not check.promote and not check.underpowered
    assert screened(check) == check


def test_a_passing_check_is_left_as_it_is() -> None:
    check = decide(**_paired(1000, 800, 900))
    assert check.promote
    assert screened(check) == check


def test_the_screen_follows_the_policy_it_was_decided_with() -> None:
    # superiority on few rows: +5 pts is not shown superior, the screen still defers
    policy = GatePolicy(new_data_rule="superior")
    check = decide(**_paired(20, 14, 15), policy=policy)
    assert not check.promote and check.underpowered
    assert screened(check).promote
