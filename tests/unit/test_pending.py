"""The no-op fast path: `evergreen run` with nothing pending answers from the ledger alone."""

from __future__ import annotations

import json

import pytest

from evergreen import cli
from evergreen.config import load_config
from evergreen.errors import UsageError
from evergreen.pending import BatchSelection, choose_batches, nothing_pending, skipped_outcome
from flows.common import nothing_to_do
from tasks import ledger
from tests.digits_pipeline import digits_frame, write_batch, write_config


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("pending")
    landing = tmp_path / "landing"
    write_batch(landing, "2026-01-01", digits_frame(slice(0, 20)))
    config = write_config(tmp_path, landing, tmp_path / "home")
    return {"config": str(config), "cfg": load_config(config), "landing": landing}


def test_skipped_outcome_is_what_the_flow_returns():
    assert skipped_outcome("daily-lora") == nothing_to_do("daily-lora").to_dict()


def test_fast_path_follows_the_ledger_and_never_skips_forced_runs(pipeline):
    cfg = pipeline["cfg"]
    assert not nothing_pending(cfg, "daily-lora", {})  # 2026-01-01 has arrived, not processed
    assert not nothing_pending(cfg, "daily-lora", {"batch_ids": ["2026-01-01"]})
    ledger.record(cfg, "daily-lora", ["2026-01-01"], "rejected")
    assert nothing_pending(cfg, "daily-lora", {})
    assert not nothing_pending(cfg, "weekly-replay", {})  # the ledger is per cadence
    assert not nothing_pending(cfg, "daily-lora", {"force": True})
    forced = {"batch_ids": ["2026-01-01"], "force": True}
    assert not nothing_pending(cfg, "daily-lora", forced)
    # named but processed and not forced: the flow would skip it too (a no-op rerun)
    assert nothing_pending(cfg, "daily-lora", {"batch_ids": ["2026-01-01"]})
    with pytest.raises(UsageError, match="2026-01-09: not in the landing zone"):
        nothing_pending(cfg, "daily-lora", {"batch_ids": ["2026-01-09"], "force": True})
    ledger.record(cfg, "daily-lora", ["2026-01-01"], "failed")  # a failed batch is pending again
    assert choose_batches(cfg, "daily-lora", BatchSelection()) == ["2026-01-01"]


def test_cli_no_op_run_starts_no_flow(pipeline, monkeypatch, capsys):
    ledger.record(pipeline["cfg"], "monthly-finetune", ["2026-01-01"], "promoted")

    started: list[str] = []

    def run_flow(name, **params):
        started.append(name)
        return skipped_outcome(name)

    monkeypatch.setattr(cli, "run_flow", run_flow)
    run = ["run", "monthly-finetune", "--config", pipeline["config"]]
    assert cli.main(run) == 0
    assert json.loads(capsys.readouterr().out) == skipped_outcome("monthly-finetune")
    assert started == []  # answered from the ledger: no flow run
    write_batch(pipeline["landing"], "2026-01-02", digits_frame(slice(20, 40)))
    assert cli.main(run) == 0
    assert started == ["monthly-finetune"]  # a pending batch: the flow runs


def test_a_batch_landed_without_a_marker_is_waited_for_not_skipped(tmp_path):
    """A plain copy just before `evergreen run`: the run waits out the quiescence window once
    and takes the batch (the quickstart path); a marker-less batch is not read before that."""
    import time

    landing = tmp_path / "landing"
    write_batch(landing, "2026-02-01", digits_frame(slice(0, 20)))
    (landing / "2026-02-01" / "_SUCCESS").unlink()
    config = write_config(tmp_path, landing, tmp_path / "home")
    cfg = load_config(config, ["data.arrival_quiescence_seconds=1.5"])
    started = time.monotonic()
    assert choose_batches(cfg, "daily-lora", BatchSelection()) == ["2026-02-01"]
    assert time.monotonic() - started >= 1.0  # it waited for the window, then took it


def test_the_no_op_check_does_not_load_torch_or_great_expectations():
    """The no-op path (`evergreen.pending` → `tasks.ledger`) reads the ledger only: torch
    (≈ 2.8 s to import) and GX stay unloaded until a run does work."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, evergreen.pending, tasks.ledger; "
        "print(sorted(m for m in ('torch', 'great_expectations', 'peft') if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[2]  # `-c` imports from the working directory
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root
    )
    assert out.stdout.strip() == "[]"


def _quarantined(tmp_path, cadence: str, batch_id: str):
    """A landed batch `cadence` quarantined as its files are now: (config, the data file)."""
    from data_plane.arrival import listing_signature
    from data_plane.landing import open_landing

    landing = tmp_path / "landing"
    write_batch(landing, batch_id, digits_frame(slice(0, 20)))
    cfg = load_config(write_config(tmp_path, landing, tmp_path / "home"))
    listed = listing_signature(open_landing(str(landing)).scan()[batch_id])
    details = {"reason": "NaN", "fingerprint": "f1", "listing": listed}
    ledger.record(cfg, cadence, [batch_id], "quarantined", details=details)
    (part,) = [p for p in (landing / batch_id).iterdir() if not p.name.startswith("_")]
    return cfg, part


def test_a_quarantined_batch_fixed_in_place_is_taken_again_by_that_cadence(tmp_path):
    """3 a.m.: a batch was quarantined, someone fixes the file where it lies; the next scheduled
    run must re-validate it without a `--force` (which would retake every batch)."""
    import os

    cfg, part = _quarantined(tmp_path, "weekly-replay", "2026-03-01")
    assert choose_batches(cfg, "weekly-replay", BatchSelection()) == []
    (part.parent / "_SUCCESS").touch()  # a marker rewritten: no data changed
    assert choose_batches(cfg, "weekly-replay", BatchSelection()) == []
    part.write_bytes(part.read_bytes())  # the export rewritten in place
    os.utime(part, (1e9, 1e9))  # a modification time that surely differs from the listed one
    assert choose_batches(cfg, "weekly-replay", BatchSelection()) == ["2026-03-01"]
    assert nothing_pending(cfg, "daily-lora", {}) is False  # other cadences: as before


def test_the_cli_check_leaves_the_changed_quarantine_warning_to_the_flow(tmp_path, caplog):
    """The no-op check finds a fixed batch pending, so the flow runs and warns; the check itself
    stays quiet (the console showed the same line twice)."""
    import logging
    import os

    cfg, part = _quarantined(tmp_path, "daily-lora", "2026-04-01")
    os.utime(part, (1e9, 1e9))
    with caplog.at_level(logging.WARNING, logger="model_registry.ledger"):
        assert nothing_pending(cfg, "daily-lora", {}) is False
        assert not [r for r in caplog.records if "changed since" in r.getMessage()]
        assert choose_batches(cfg, "daily-lora", BatchSelection()) == ["2026-04-01"]
        assert [r for r in caplog.records if "changed since" in r.getMessage()]


def test_a_forced_run_without_batch_ids_says_it_retakes_every_batch(pipeline, monkeypatch, caplog):
    """`--force` alone retakes every arrived batch, processed or not: said once, as a warning,
    because a forced rerun usually means one batch."""
    import logging

    from tasks import ingest

    monkeypatch.setattr(ingest, "get_run_logger", lambda: logging.getLogger("evergreen.test"))
    write_batch(pipeline["landing"], "2026-01-03", digits_frame(slice(40, 60)))
    with caplog.at_level(logging.INFO, logger="evergreen.test"):
        every = ingest.discover_batches.fn(
            pipeline["cfg"], "stream-monitor", BatchSelection(force=True)
        )
        named = BatchSelection(batch_ids=("2026-01-03",), force=True)
        assert ingest.discover_batches.fn(pipeline["cfg"], "stream-monitor", named) == [
            "2026-01-03"
        ]
    assert len(every) > 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"retaking every arrived batch ({len(every)})" in warnings[0]
