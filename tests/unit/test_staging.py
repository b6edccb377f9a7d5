"""Staging folders of killed runs are swept at flow start; live or young ones never are."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tasks.staging import OWNER_FILE, STALE_AFTER_SECONDS, owned, sweep_stale

ROOT = Path(__file__).resolve().parents[2]
HOLDER = """
import sys, time
from pathlib import Path
from tasks.staging import owned
with owned(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def _folder(staging: Path, name: str, age: float) -> Path:
    folder = staging / name
    folder.mkdir(parents=True)
    (folder / "checkpoint").mkdir()
    (folder / "checkpoint" / "model.safetensors").write_bytes(b"weights")
    stamp = time.time() - age
    os.utime(folder, (stamp, stamp))
    return folder


def _killed_owner(folder: Path) -> None:
    """Make `folder` owned by a process that is then SIGKILLed, as a killed flow run leaves it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)


def test_only_old_folders_without_a_live_owner_are_swept(tmp_path):
    staging = tmp_path / "staging"
    old = STALE_AFTER_SECONDS + 60
    killed = _folder(staging, "weekly-replay-killed", 0)
    _killed_owner(killed)
    stamp = time.time() - old
    os.utime(killed, (stamp, stamp))
    ownerless = _folder(staging, "daily-lora-no-owner", old)
    young = _folder(staging, "daily-lora-young", 60)
    _killed_owner(young)
    live = _folder(staging, "monthly-live", old)
    outside = _folder(tmp_path, "outside", old)
    (staging / "link").symlink_to(outside, target_is_directory=True)
    os.utime(live, (stamp, stamp))

    with owned(live):
        os.utime(live, (stamp, stamp))  # the owner file touched the folder; age it again
        removed = sweep_stale(staging)
        assert (live / "checkpoint" / "model.safetensors").exists()  # its run is alive
    assert sorted(removed) == ["daily-lora-no-owner", "weekly-replay-killed"]
    assert not killed.exists() and not ownerless.exists()
    assert young.exists()  # dead owner, but inside the safe age
    assert (outside / "checkpoint" / "model.safetensors").exists()  # symlink not followed
    assert (staging / "link").is_symlink()
    assert (live / OWNER_FILE).read_text().strip() == str(os.getpid())


def test_a_missing_staging_folder_is_nothing_to_sweep(tmp_path):
    assert sweep_stale(tmp_path / "staging") == []


def test_the_workspace_owns_its_folder_and_removes_it(tmp_path):
    from evergreen.config import load_config
    from tasks.promote import challenger_workspace
    from tests.digits_pipeline import write_config

    cfg = load_config(write_config(tmp_path, tmp_path / "landing", tmp_path / "home"))
    with challenger_workspace(cfg, "weekly-replay", []) as staging:
        assert staging.parent == cfg.home_path / "staging"
        stamp = time.time() - STALE_AFTER_SECONDS - 60
        os.utime(staging, (stamp, stamp))
        assert sweep_stale(staging.parent) == []  # held by this run
    assert not staging.exists()
