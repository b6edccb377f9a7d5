"""Fault injection: the disk fills up, or a write is denied, while a flow run writes state.

A real `evergreen run weekly-replay` is paused at a named point (`model_registry/fault_hooks.py`,
`EVERGREEN_TEST_PAUSE_AT`); the test then takes the room away from that very process and lets it
go on:

- disk full: `prlimit(RLIMIT_FSIZE, 0)` on the running process (Python ignores SIGXFSZ, so every
  write that would grow a file fails with EFBIG, as on a full disk: the checkpoint's files, the
  MLflow SQLite store and its artifact store alike);
- a denied write: the MLflow artifact store stops taking writes from the run: its folders lose
  their write bits (EACCES); as root, which ignores modes, the run gets its own mount namespace
  (`unshare`) and the store is bind-mounted read-only inside it (EROFS), the host untouched.

Each time: exit code 8 and one `evergreen: error: storage: …` line (no traceback), the champion
and its artifacts unchanged and loadable, no new model version, no `challenger` alias, the batch
still pending, no temporary or half-written file left in the pipeline's home. The ledger cannot
take the `failed` entry either: the run's attempt marker (`tasks.attempts`) is renamed to carry
the error instead. The next run, with the room back, records those attempts as `failed` with
their errors and processes the batch exactly once.

Run: `pytest -m integration tests/integration/test_faults_disk.py`.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evergreen.config import load_config
from evergreen.errors import ExitCode
from model_registry.fault_hooks import HANG_SIGNAL, PAUSE_AT
from model_registry.ledger import Ledger
from model_registry.registry import Registry
from tasks.attempts import ATTEMPTS_DIR, FAILED_MARK
from tasks.memory import memory_store, read_memory
from tests.digits_pipeline import digits_frame, write_batch, write_config
from tests.integration.test_faults import _cli, _env

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CADENCE = "weekly-replay"
BATCH = "2026-04-02"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A bootstrapped pipeline with one pending batch (shared: no fault may change it)."""
    root = tmp_path_factory.mktemp("disk")
    landing = root / "landing"
    write_batch(landing, "2026-04-01", digits_frame(slice(0, 500)))
    write_batch(landing, BATCH, digits_frame(slice(500, 800), shift=1))
    config = str(write_config(root, landing, root / "home", weekly={"train": {"steps": 20}}))
    done = _cli(root, "run", "bootstrap", "--config", config, "--batch", "2026-04-01")
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = load_config(config)
    registry = Registry.from_config(cfg)
    return {
        "root": root,
        "config": config,
        "cfg": cfg,
        "champion": registry.champion().version,
        "versions": len(registry.versions(limit=100)),
    }


def _run_with_fault(
    pipeline: dict, point: str, fault, prefix: list[str] | None = None
) -> subprocess.CompletedProcess:
    """`evergreen run weekly-replay`, paused at `point`; `fault(pid)` is applied, then it goes on."""
    root = pipeline["root"]
    signal_file = root / f"reached-{point}"
    pipeline["files"] = set(pipeline["cfg"].home_path.rglob("*"))
    env = {**_env(root), PAUSE_AT: point, HANG_SIGNAL: str(signal_file)}
    command = [*(prefix or []), sys.executable, "-m", "evergreen.cli", "run", CADENCE]
    command += ["--config", pipeline["config"]]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    run = subprocess.Popen(command, cwd=root, env=env, **pipes)
    deadline = time.monotonic() + 600
    while not signal_file.exists():
        assert run.poll() is None, run.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{point} never reached"
        time.sleep(0.3)
    fault(run.pid)
    signal_file.unlink()  # release the pause
    out, err = run.communicate(timeout=600)
    return subprocess.CompletedProcess(command, run.returncode, out, err)


def _disk_full(pid: int) -> None:
    """From now on the process cannot grow any file by one byte (EFBIG, SIGXFSZ is ignored)."""
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, 0))


def _assert_failed_cleanly(pipeline: dict, done: subprocess.CompletedProcess) -> str:
    """The checks every fault shares; returns the error line."""
    assert done.returncode == ExitCode.STORAGE, done.stderr[-4000:]
    assert "Traceback" not in done.stderr, done.stderr[-4000:]
    lines = [x for x in done.stderr.splitlines() if x.startswith("evergreen: error: ")]
    assert len(lines) == 1, done.stderr[-4000:]
    assert lines[0].startswith("evergreen: error: storage: "), lines[0]
    cfg = pipeline["cfg"]
    registry = Registry.from_config(cfg)
    assert registry.champion().version == pipeline["champion"]
    assert registry.aliases() == {"champion": pipeline["champion"]}  # no challenger left
    assert len(registry.versions(limit=100)) == pipeline["versions"]  # nothing half-registered
    registry.verify_artifacts(pipeline["champion"])  # the served files are whole and loadable
    assert not Ledger.from_config(cfg).is_processed(CADENCE, BATCH)  # still pending
    read_memory(cfg, memory_store(cfg).head())  # the data memory still reads
    home = cfg.home_path
    assert not list((home / "staging").glob(f"{CADENCE}-*")), "the staging folder was left"
    new = set(home.rglob("*")) - pipeline["files"]
    leftovers = [p for p in new if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert not leftovers, f"temporary files left in the home: {leftovers}"
    return lines[0]


@pytest.mark.parametrize(
    "point",
    [
        "promote.before-checkpoint",  # the challenger's checkpoint files cannot be written
        "registry.run-logged",  # the model version's row cannot be added to the MLflow store
    ],
)
def test_disk_full_while_writing_state_fails_cleanly(pipeline, point):
    done = _run_with_fault(pipeline, point, _disk_full)
    line = _assert_failed_cleanly(pipeline, done)
    assert "file too large" in line or "SQLite" in line, line
    # the ledger could not take `failed` either: the run's attempt marker now names the error;
    # an earlier such attempt was recorded by this run's start, before the disk filled up
    markers = list((pipeline["cfg"].home_path / ATTEMPTS_DIR).glob(f"{CADENCE}-*{FAILED_MARK}*"))
    assert len(markers) == 1, markers
    assert _unrecorded_entries(pipeline) == pipeline.get("unrecorded", 0)
    pipeline["unrecorded"] = pipeline.get("unrecorded", 0) + 1


def _unrecorded_entries(pipeline: dict) -> int:
    """`failed` entries a later run recorded for attempts that could not record their own."""
    entries = Ledger.from_config(pipeline["cfg"]).entries(CADENCE)
    return sum("could not record it" in e.details.get("error", "") for e in entries)


def _own_mount_namespace() -> list[str]:
    """A command prefix giving the run a private mount namespace (root: modes do not stop it,
    a read-only mount does), or skip when this machine forbids it."""
    prefix = ["unshare", "--mount", "--propagation", "private", "--"]
    if shutil.which("unshare") is None or subprocess.run([*prefix, "true"]).returncode != 0:
        pytest.skip("running as root without mount namespaces: cannot deny a write to root")
    return prefix


def _deny_writes(store: Path, pid: int) -> None:
    """Writes under `store` now fail for the running process: EACCES (modes) for a normal
    user; for root, EROFS from a read-only bind mount inside the run's own mount namespace."""
    if os.geteuid() != 0:
        for path in [store, *store.rglob("*")]:
            if path.is_dir():
                path.chmod(0o555)
        return
    remount = f"mount --bind {store} {store} && mount -o remount,bind,ro {store}"
    subprocess.run(["nsenter", "-t", str(pid), "-m", "--", "sh", "-c", remount], check=True)


def test_a_denied_write_to_the_artifact_store_fails_cleanly(pipeline):
    """The artifact store stops taking writes from the run before the challenger is logged."""
    store = pipeline["cfg"].home_path / "mlartifacts"
    assert store.is_dir(), list(pipeline["cfg"].home_path.iterdir())
    prefix = _own_mount_namespace() if os.geteuid() == 0 else []
    try:
        done = _run_with_fault(
            pipeline, "promote.before-checkpoint", lambda pid: _deny_writes(store, pid), prefix
        )
    finally:
        for path in [store, *store.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
    line = _assert_failed_cleanly(pipeline, done)
    assert "permission denied" in line or "read-only" in line, line


def test_the_next_run_with_room_processes_the_batch_exactly_once(pipeline):
    done = _cli(pipeline["root"], "run", CADENCE, "--config", pipeline["config"])
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = pipeline["cfg"]
    entries = [e for e in Ledger.from_config(cfg).entries(CADENCE) if e.batch_id == BATCH]
    assert [e.outcome for e in entries if e.outcome != "failed"] in (["promoted"], ["rejected"])
    # the disk-full attempts, which could not record `failed`, were recorded by this run
    unrecorded = [e for e in entries if "could not record it" in e.details.get("error", "")]
    assert len(unrecorded) == pipeline.get("unrecorded", 0), [e.details for e in entries]
    for entry in unrecorded:
        assert entry.details["interrupted"] == "true"
        assert "File too large" in entry.details["error"] or "SQLite" in entry.details["error"]
    assert not list((cfg.home_path / ATTEMPTS_DIR).iterdir())
    assert set(Registry.from_config(cfg).aliases()) == {"champion"}
