"""`evergreen report` from the ledger: one row per run, not one per batch and cadence."""

from __future__ import annotations

from evergreen.history import merge_run_rows
from evergreen.report import TimelineRow


def _row(flow, batch, decision, date="2026-12-07T14:14:04", note="gate says", champion="5"):
    return TimelineRow(
        date=date,
        flow=flow,
        batch_ids=[batch],
        decision=decision,
        champion_version=champion,
        new_accuracy=0.9,
        retention_accuracy=1.0,
        forgetting=None,
        note=note,
    )


def test_the_entries_of_one_run_are_one_row_quarantines_keep_theirs():
    rows = [
        _row("weekly-replay", "b2", "promoted"),
        _row("weekly-replay", "b3", "promoted"),
        _row("weekly-replay", "b4", "quarantined", note="batch b4: INVALID"),
        _row("weekly-replay", "b5", "quarantined", note="batch b4: INVALID"),
        _row("monthly-finetune", "b2", "rejected", date="2026-12-07T14:14:32"),
        _row("monthly-finetune", "b3", "rejected", date="2026-12-07T14:14:32"),
        _row("monthly-finetune", "b6", "rejected", date="2026-12-07T15:20:00"),  # a later run
    ]
    merged = merge_run_rows(rows)
    assert [(r.flow, r.decision, r.batch_ids) for r in merged] == [
        ("weekly-replay", "promoted", ["b2", "b3"]),
        ("weekly-replay", "quarantined", ["b4"]),
        ("weekly-replay", "quarantined", ["b5"]),
        ("monthly-finetune", "rejected", ["b2", "b3"]),
        ("monthly-finetune", "rejected", ["b6"]),
    ]
