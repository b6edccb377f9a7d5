"""A flow that crashes mid-way leaves no staging files and records `failed` in the ledger."""

from __future__ import annotations

import pytest

from evergreen.config import config_from_dict
from model_registry.ledger import Ledger
from tasks.promote import challenger_workspace


def test_crash_records_failed_and_cleans_up(tmp_path):
    cfg = config_from_dict(
        {"home": str(tmp_path), "data": {"features": ["a"], "label": "y", "classes": [0, 1]}}
    )
    with (
        pytest.raises(RuntimeError, match="out of memory"),
        challenger_workspace(cfg, "weekly-replay", ["2026-01-01"]) as staging,
    ):
        (staging / "checkpoint").mkdir()
        raise RuntimeError("out of memory")
    assert not staging.exists()
    ledger = Ledger.from_config(cfg)
    entry = ledger.processed("weekly-replay")["2026-01-01"]
    assert entry.outcome == "failed" and "out of memory" in entry.details["error"]
    assert not ledger.is_processed("weekly-replay", "2026-01-01")  # retried by the next run


def test_success_leaves_no_ledger_entry_of_its_own(tmp_path):
    cfg = config_from_dict(
        {"home": str(tmp_path), "data": {"features": ["a"], "label": "y", "classes": [0, 1]}}
    )
    with challenger_workspace(cfg, "daily-lora", ["2026-01-02"]) as staging:
        assert staging.is_dir()
    assert not staging.exists()
    assert Ledger.from_config(cfg).processed("daily-lora") == {}


def _saved_state(cfg, cadence: str):
    from tasks.resume import resume_root

    state = resume_root(cfg, cadence) / "key" / "fit.safetensors"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"training state")
    return state


def test_a_run_stopped_at_its_time_limit_keeps_its_training_state_for_the_next(tmp_path):
    """A fit longer than `train.timeout_minutes` finishes over several runs instead of starting
    over (and timing out) every time; the batches stay pending as after any failure."""
    cfg = config_from_dict(
        {"home": str(tmp_path), "data": {"features": ["a"], "label": "y", "classes": [0, 1]}}
    )
    with (
        pytest.raises(TimeoutError),
        challenger_workspace(cfg, "monthly-finetune", ["2026-01-01"]) as staging,
    ):
        state = _saved_state(cfg, "monthly-finetune")
        raise TimeoutError("Task run exceeded timeout of 3600.0 second(s)")
    assert state.is_file() and not staging.exists()
    assert not Ledger.from_config(cfg).is_processed("monthly-finetune", "2026-01-01")


@pytest.mark.parametrize("error", [RuntimeError("out of memory"), ValueError("diverged")])
def test_any_other_failure_discards_the_training_state(tmp_path, error):
    cfg = config_from_dict(
        {"home": str(tmp_path), "data": {"features": ["a"], "label": "y", "classes": [0, 1]}}
    )
    with (
        pytest.raises(type(error)),
        challenger_workspace(cfg, "monthly-finetune", ["2026-01-01"]),
    ):
        state = _saved_state(cfg, "monthly-finetune")
        raise error
    assert not state.exists()
