"""Without a Prefect server, the training slot is a kernel file lock: a run that is SIGKILLed
while training frees it at once (an ephemeral Prefect slot would stay occupied forever)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model_registry.locking import LockTimeoutError
from tasks.limits import ensure_limits, on_server, training_slot

ROOT = Path(__file__).resolve().parents[2]
HOLDER = """
import sys, time
from pathlib import Path
from tasks.limits import training_slot
with training_slot("p", Path(sys.argv[1])):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_a_killed_trainer_frees_the_training_slot(tmp_path):
    assert not on_server() and ensure_limits("p") == []  # nothing to create without a server
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        with (
            pytest.raises(LockTimeoutError, match="training lock"),
            training_slot("p", tmp_path, timeout_seconds=0.5),
        ):
            pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        started = time.monotonic()
        with training_slot("p", tmp_path, timeout_seconds=5):
            assert time.monotonic() - started < 1
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_sections_time_limit_bounds_its_training_task():
    """`train.timeout_minutes` reaches Prefect: the task fails at the section's limit, not the
    decorator's hour (and the limit does not change what a resumed run must match)."""
    from prefect import flow, task

    from evergreen.config import TrainConfig, config_from_dict
    from tasks.limits import time_limited
    from tasks.resume import config_hash

    @task
    def slow_training() -> str:
        time.sleep(20)
        return "trained"

    @flow
    def cadence(minutes: float) -> str:
        return time_limited(slow_training, TrainConfig(timeout_minutes=minutes))()

    with pytest.raises(TimeoutError, match=r"after 1\.2 second"):  # Prefect's, as a flow meets it
        cadence(0.02)
    assert time_limited(slow_training, TrainConfig(timeout_minutes=180)).timeout_seconds == 10800
    data = {"features": ["a"], "label": "y", "classes": [0, 1]}
    one_hour = config_from_dict({"data": data})
    three_hours = one_hour.model_copy(deep=True)
    three_hours.weekly.train.timeout_minutes = 180
    assert config_hash(one_hour) == config_hash(three_hours)
