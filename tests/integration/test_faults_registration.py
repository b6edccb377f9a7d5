"""Fault injection: a flow run SIGKILLed while its challenger is being registered.

Two points, held by the test hook `EVERGREEN_TEST_HANG_AT` (`model_registry/fault_hooks.py`):
- `registry.run-logged`: the MLflow run holds the logged model, no model version exists yet;
- `promote.challenger-set`: the version exists and carries `challenger`, nothing promoted yet.
In both, the champion is unchanged, nothing is served that was not gated, the batch stays
pending, and the next run records the killed attempt as `failed` (interrupted), processes the
batch exactly once, removes the killed run's staging folder and leaves no `challenger` alias.

Run: `pytest -m integration tests/integration/test_faults_registration.py`.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from evergreen.config import load_config
from model_registry.fault_hooks import HANG_AT, HANG_SIGNAL
from model_registry.ledger import Ledger
from model_registry.registry import Registry
from tasks.staging import STALE_AFTER_SECONDS
from tests.digits_pipeline import digits_frame, write_batch, write_config
from tests.integration.servers import background
from tests.integration.test_faults import _cli, _env

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CADENCE = "weekly-replay"
BATCH = "2026-04-02"


def _kill_at(tmp_path: Path, config: str, point: str) -> None:
    """Run the cadence until it reaches `point`, then SIGKILL its whole process group."""
    signal_file = tmp_path / "reached"
    env = {**_env(tmp_path), HANG_AT: point, HANG_SIGNAL: str(signal_file)}
    command = [sys.executable, "-m", "evergreen.cli", "run", CADENCE, "--config", config]
    log = tmp_path / "killed.log"
    with background(command, env=env, log=log, cwd=tmp_path) as run:
        deadline = time.monotonic() + 600
        while not signal_file.exists():
            assert run.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{point} never reached"
            time.sleep(0.5)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=30)


def _age(folder: Path) -> None:
    """Make a folder look older than the sweep's safe age (the time a real operator waits)."""
    stamp = time.time() - STALE_AFTER_SECONDS - 60
    os.utime(folder, (stamp, stamp))


@pytest.mark.parametrize("point", ["registry.run-logged", "promote.challenger-set"])
def test_a_run_killed_mid_registration_loses_nothing_and_the_next_run_recovers(tmp_path, point):
    landing = tmp_path / "landing"
    write_batch(landing, "2026-04-01", digits_frame(slice(0, 500)))
    write_batch(landing, BATCH, digits_frame(slice(500, 800), shift=1))
    config = str(write_config(tmp_path, landing, tmp_path / "home"))
    done = _cli(tmp_path, "run", "bootstrap", "--config", config, "--batch", "2026-04-01")
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = load_config(config)
    registry, ledger = Registry.from_config(cfg), Ledger.from_config(cfg)
    champion, versions = registry.champion().version, len(registry.versions(limit=100))

    _kill_at(tmp_path, config, point)

    assert registry.champion().version == champion
    assert not ledger.is_processed(CADENCE, BATCH)  # still pending
    left = list((cfg.home_path / "staging").glob(f"{CADENCE}-*"))
    assert len(left) == 1  # the killed run could not remove its staging folder
    after_kill = registry.versions(limit=100)
    if point == "registry.run-logged":
        assert len(after_kill) == versions  # a run without a version: nothing registered
        assert registry.aliases() == {"champion": champion}
    else:
        assert len(after_kill) == versions + 1
        orphan = after_kill[0].version
        assert registry.aliases() == {"champion": champion, "challenger": orphan}
    _age(left[0])

    again = _cli(tmp_path, "run", CADENCE, "--config", config)
    assert again.returncode == 0, again.stderr[-3000:]
    entries = [e for e in ledger.entries(CADENCE) if e.batch_id == BATCH]
    outcomes = [e.outcome for e in entries]  # newest first
    assert outcomes[0] in ("promoted", "rejected") and outcomes[1:] == ["failed"]  # once
    assert entries[1].details["interrupted"] == "true"  # the killed attempt, seen by the rerun
    assert set(registry.aliases()) == {"champion"}  # no orphan alias
    now = registry.champion().version
    final = registry.versions(limit=100)
    assert len(final) == len(after_kill) + 1  # the rerun registered one version
    assert now in (champion, final[0].version)  # the old champion or the gated rerun's version
    assert not left[0].exists()  # swept at the start of the rerun
