"""Attempt markers (tasks/attempts.py): an attempt that ended without a ledger entry — killed,
or failed with the disk too full to record it — is recorded as `failed` by the next run, with
the reason found; a live attempt, or one that recorded its own outcome, is left alone.

A dead owner is simulated by closing the marker's descriptor, which drops its `flock` exactly as
the kernel does when the process dies (the SIGKILL itself is in
`tests/integration/test_faults_resume.py` and `test_faults_registration.py`).
"""

from __future__ import annotations

import json
import os

import pytest

from evergreen.config import load_config
from model_registry.ledger import Ledger
from tasks import attempts, ledger
from tests.digits_pipeline import write_config

CADENCE = "weekly-replay"


@pytest.fixture
def cfg(tmp_path):
    return load_config(write_config(tmp_path, tmp_path / "landing", tmp_path / "home"))


def _die(cfg) -> None:
    """The run's process is gone: its marker stays, its lock is released."""
    attempt = attempts._open.pop((str(cfg.home_path), CADENCE))
    os.close(attempt.fd)


def _markers(cfg) -> list[str]:
    folder = cfg.home_path / attempts.ATTEMPTS_DIR
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _entries(cfg, batch: str) -> list:
    return [e for e in Ledger.from_config(cfg).entries(CADENCE) if e.batch_id == batch]


def test_a_killed_attempt_is_recorded_failed_as_interrupted_by_the_next_run(cfg):
    attempts.begin(cfg, CADENCE, ["b1", "b2"])
    (marker,) = _markers(cfg)
    assert json.loads((cfg.home_path / "attempts" / marker).read_text())["batch_ids"] == [
        "b1",
        "b2",
    ]
    _die(cfg)
    lines = attempts.reconcile(cfg)
    assert len(lines) == 1 and "interrupted" in lines[0]
    for batch in ("b1", "b2"):
        (entry,) = _entries(cfg, batch)
        assert entry.outcome == "failed" and entry.details["interrupted"] == "true"
        assert "ended without recording an outcome" in entry.details["error"]
    assert _markers(cfg) == []
    assert ledger.processed(cfg, CADENCE) == set()  # failed: still pending
    assert attempts.reconcile(cfg) == []  # recorded once


def test_an_attempt_that_could_not_write_failed_is_recorded_with_its_error(cfg):
    attempts.begin(cfg, CADENCE, ["b1"])
    attempts.unrecorded(cfg, CADENCE, OSError(27, "File too large"))
    (marker,) = _markers(cfg)
    assert attempts.FAILED_MARK in marker and len(marker) < 255
    _die(cfg)
    attempts.reconcile(cfg)
    (entry,) = _entries(cfg, "b1")
    assert entry.outcome == "failed"
    assert "could not record it" in entry.details["error"]
    assert "OSError: [Errno 27] File too large" in entry.details["error"]


def test_a_long_odd_error_still_fits_a_file_name(cfg):
    attempts.begin(cfg, CADENCE, ["b1"])
    attempts.unrecorded(cfg, CADENCE, RuntimeError("é/../" * 200))
    (marker,) = _markers(cfg)
    assert "/" not in marker and len(marker.encode()) < 255
    _die(cfg)
    attempts.reconcile(cfg)
    assert "RuntimeError: é" in _entries(cfg, "b1")[0].details["error"]


def test_a_live_attempt_is_left_alone(cfg):
    attempts.begin(cfg, CADENCE, ["b1"])
    assert attempts.reconcile(cfg) == []
    assert _entries(cfg, "b1") == [] and len(_markers(cfg)) == 1
    attempts.finish(cfg, CADENCE)


def test_recording_the_outcome_removes_the_marker(cfg):
    attempts.begin(cfg, CADENCE, ["b1"])
    ledger.record(cfg, CADENCE, ["b1"], "rejected")
    assert _markers(cfg) == []


def test_an_attempt_killed_after_recording_its_outcome_gets_no_failed_entry(cfg):
    attempts.begin(cfg, CADENCE, ["b1"])
    Ledger.from_config(cfg).record(CADENCE, "b1", "promoted")  # then killed: the marker stays
    _die(cfg)
    assert attempts.reconcile(cfg) == []
    assert [e.outcome for e in _entries(cfg, "b1")] == ["promoted"]
    assert _markers(cfg) == []


def test_a_young_attempt_of_another_host_is_left_alone(cfg):
    folder = cfg.home_path / "attempts"
    folder.mkdir(parents=True)
    facts = {"cadence": CADENCE, "batch_ids": ["b1"], "host": "elsewhere", "started_at": "x"}
    (folder / f"{CADENCE}-other.json").write_text(json.dumps(facts))
    assert attempts.reconcile(cfg) == []
    assert _entries(cfg, "b1") == []
