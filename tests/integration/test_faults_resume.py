"""Fault injection: a long fine-tune SIGKILLed mid-training resumes instead of starting over.

A real `evergreen run monthly-finetune` (60 steps, its state saved every 20) is held by the test
hook `EVERGREEN_TEST_HANG_AT=train.state-saved` right after its first saved state (step 20)
and its whole process group is SIGKILLed there, as a pre-empted node would be. Nothing is
registered, the champion is unchanged, the batch is still pending, and the saved state is on
disk under `<home>/resume/monthly-finetune/`. The next run of the same cadence on the same
batch, champion and config resumes at step 20 of 60 (40 steps trained, not 60), is gated and
recorded exactly once, and removes the saved state when it ends. The killed attempt is in the
ledger as `failed` (interrupted), noticed and recorded by that next run.

Run: `pytest -m integration tests/integration/test_faults_resume.py`.
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
from tests.digits_pipeline import digits_frame, write_batch, write_config
from tests.integration.servers import background
from tests.integration.test_faults import _cli, _env

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CADENCE = "monthly-finetune"
BATCH = "2026-04-02"


def _kill_after_first_save(tmp_path: Path, config: str) -> None:
    signal_file = tmp_path / "reached"
    env = {**_env(tmp_path), HANG_AT: "train.state-saved", HANG_SIGNAL: str(signal_file)}
    command = [sys.executable, "-m", "evergreen.cli", "run", CADENCE, "--config", config]
    log = tmp_path / "killed.log"
    with background(command, env=env, log=log, cwd=tmp_path) as run:
        deadline = time.monotonic() + 300
        while not signal_file.exists():
            assert run.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no training state was saved"
            time.sleep(0.3)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=30)


def test_a_fine_tune_killed_mid_training_resumes_from_its_saved_state(tmp_path):
    landing = tmp_path / "landing"
    write_batch(landing, "2026-04-01", digits_frame(slice(0, 500)))
    write_batch(landing, BATCH, digits_frame(slice(500, 800), shift=1))
    monthly = {"train": {"steps": 60, "checkpoint_every_steps": 20}, "ewc_lambda": 10.0}
    config = str(write_config(tmp_path, landing, tmp_path / "home", monthly=monthly))
    done = _cli(tmp_path, "run", "bootstrap", "--config", config, "--batch", "2026-04-01")
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = load_config(config)
    registry, ledger = Registry.from_config(cfg), Ledger.from_config(cfg)
    champion, versions = registry.champion().version, len(registry.versions(limit=100))
    resume = cfg.home_path / "resume" / CADENCE
    assert not resume.exists()  # the bootstrap's own state went when it ended

    _kill_after_first_save(tmp_path, config)

    assert registry.champion().version == champion
    assert registry.aliases() == {"champion": champion}
    assert len(registry.versions(limit=100)) == versions
    assert not ledger.is_processed(CADENCE, BATCH)  # still pending
    saved = list(resume.glob("*/*.safetensors"))
    assert len(saved) == 1, list(resume.rglob("*"))

    again = _cli(tmp_path, "run", CADENCE, "--config", config)
    assert again.returncode == 0, again.stderr[-3000:]
    output = again.stdout + again.stderr
    assert "resumed at step 20 of 60" in output, output[-3000:]
    assert "60 steps (40 in this run)" in output, output[-3000:]
    outcomes = [e.outcome for e in ledger.entries(CADENCE) if e.batch_id == BATCH]
    assert outcomes[0] in ("promoted", "rejected") and outcomes[1:] == ["failed"], outcomes
    interrupted = next(e for e in ledger.entries(CADENCE) if e.outcome == "failed")
    assert interrupted.details.get("interrupted") == "true", interrupted.details
    assert set(registry.aliases()) == {"champion"}
    assert registry.champion().version in (champion, registry.versions(limit=1)[0].version)
    assert not resume.exists()  # removed once the run ended
