"""Fault injection: a training process SIGKILLed mid-epoch, promotions racing across processes
through an `mlflow server`, and the MLflow server killed mid-run. In each case nothing is lost and
the champion changes only through a completed, gated compare-and-set promotion.

Run: `pytest -m integration tests/integration/test_faults.py`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from evergreen.config import load_config
from model_registry.ledger import Ledger
from model_registry.registry import Registry
from tests.checkpoints import tiny_checkpoint
from tests.digits_pipeline import digits_frame, write_batch, write_config
from tests.integration.servers import BIN, background, free_port, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
FEATURES = ["x0", "x1", "x2"]


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(root / "prefect")}


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "evergreen.cli", *args]
    return subprocess.run(
        command, cwd=root, env=_env(root), capture_output=True, text=True, timeout=900
    )


# ------------------------------------------------------------ training killed mid-epoch


def test_training_killed_mid_epoch_loses_nothing_and_the_next_run_recovers(tmp_path):
    landing = tmp_path / "landing"
    write_batch(landing, "2026-04-01", digits_frame(slice(0, 500)))
    write_batch(landing, "2026-04-02", digits_frame(slice(500, 800), shift=1))
    endless = {"train": {"steps": 1_000_000}, "ewc_lambda": 10.0}
    config = str(write_config(tmp_path, landing, tmp_path / "home", weekly=endless))
    done = _cli(tmp_path, "run", "bootstrap", "--config", config, "--batch", "2026-04-01")
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = load_config(config)
    registry, ledger = Registry.from_config(cfg), Ledger.from_config(cfg)
    champion, versions = registry.champion().version, len(registry.versions())

    command = [sys.executable, "-m", "evergreen.cli", "run", "weekly-replay", "--config", config]
    with background(command, env=_env(tmp_path), log=tmp_path / "killed.log", cwd=tmp_path) as run:
        staging = cfg.home_path / "staging"
        deadline = time.monotonic() + 300
        while not any(staging.glob("weekly-replay-*")):  # the challenger workspace: training
            assert run.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.5)
        time.sleep(3)  # well inside the million-step loop
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=30)

    assert registry.champion().version == champion
    assert registry.aliases() == {"champion": champion}  # no orphan challenger alias
    assert len(registry.versions()) == versions  # nothing half-registered
    assert not ledger.is_processed("weekly-replay", "2026-04-02")  # still pending

    again = _cli(
        tmp_path, "run", "weekly-replay", "--config", config, "--set", "weekly.train.steps=40"
    )
    assert again.returncode == 0, again.stderr[-3000:]
    entry = ledger.processed("weekly-replay")["2026-04-02"]
    assert entry.outcome in ("promoted", "rejected")
    assert set(registry.aliases()) == {"champion"}


# ------------------------------------------------------------ an mlflow server we can kill


@contextmanager
def mlflow_server(root: Path, port: int) -> Iterator[subprocess.Popen]:
    """`mlflow server` on a fixed port with a store under `root` (restartable on the same port)."""
    command = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root}/server.db",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--workers",
        "1",
    ]
    env = {
        **os.environ,
        "MLFLOW_ENABLE_TELEMETRY": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    log = root / f"server-{time.monotonic_ns()}.log"
    with background(command, env=env, log=log, cwd=root) as process:
        wait_http(f"http://127.0.0.1:{port}/health", 240, process, log)
        yield process


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("mlflow-faults")
    port = free_port()
    with mlflow_server(root, port) as process:
        yield {"url": f"http://127.0.0.1:{port}", "root": root, "port": port, "process": process}


def _registry(server: dict, name: str) -> Registry:
    return Registry(server["url"], name, lock_dir=server["root"] / "locks")


def _versions(server: dict, registry: Registry, n: int, tmp_path: Path) -> list[str]:
    paths = [tiny_checkpoint(tmp_path / f"c{i}", i, FEATURES, [0, 1], 6) for i in range(n)]
    return [registry.log_version(p, lineage={"cadence": "test"}).version for p in paths]


RACER = """
import json, sys, time
from pathlib import Path
from model_registry.registry import Registry
url, name, locks, version, expected, start = sys.argv[1:]
registry = Registry(url, name, lock_dir=Path(locks))
time.sleep(max(0.0, float(start) - time.time()))
result = registry.promote(version, expected_champion=expected, reason="race", actor=version)
print(json.dumps({"version": version, "promoted": result.promoted, "stale": result.stale}))
"""


def test_promotions_racing_across_processes_through_the_server_one_wins(server, tmp_path):
    registry = _registry(server, "race")
    v1, *challengers = _versions(server, registry, 4, tmp_path)
    assert registry.promote(v1, expected_champion=None, reason="bootstrap").promoted
    start = f"{time.time() + 8:.3f}"  # every racer has imported MLflow by then
    locks = str(server["root"] / "locks")  # one host: the flock serialises the processes
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, server["url"], "race", locks, version, v1, start],
            env=_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for version in challengers
    ]
    results = []
    for racer in racers:
        out, err = racer.communicate(timeout=300)
        assert racer.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    winners = [r["version"] for r in results if r["promoted"]]
    assert len(winners) == 1, results
    assert all(r["stale"] for r in results if not r["promoted"]), results
    assert registry.champion().version == winners[0]
    promotions = [(e.version, e.previous) for e in registry.history()]
    assert promotions == [(winners[0], v1), (v1, None)]  # the losers never moved the alias


def test_a_killed_mlflow_server_is_retried_with_backoff_then_fails_clearly(
    server, tmp_path, monkeypatch
):
    """Last test of the module: it kills the shared server (and stops its replacement)."""
    registry = _registry(server, "outage")
    v1, v2 = _versions(server, registry, 2, tmp_path)
    assert registry.promote(v1, expected_champion=None, reason="bootstrap").promoted
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")

    os.killpg(server["process"].pid, signal.SIGKILL)  # the server dies mid-run
    server["process"].wait(timeout=30)
    started = time.monotonic()
    with pytest.raises((MlflowException, OSError)) as failure:
        registry.promote(v2, expected_champion=v1, reason="during the outage")
    waited = time.monotonic() - started
    assert waited >= 3, f"gave up after {waited:.1f}s: no backoff"  # 1 + 2 s between 3 tries
    assert str(server["port"]) in str(failure.value)  # names the endpoint that is down

    # the server comes back while a call is still retrying: the call succeeds
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "8")
    restarted: list = []
    ready = threading.Event()

    def restart() -> None:
        with mlflow_server(server["root"], server["port"]) as process:
            restarted.append(process)
            ready.set()
            while not stop.is_set():
                time.sleep(0.2)

    stop = threading.Event()
    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    try:
        champion = registry.champion()  # issued while the server is still starting
        assert ready.wait(timeout=300)
        assert champion is not None and champion.version == v1  # unchanged by the outage
        assert registry.aliases() == {"champion": v1}
        assert [e.version for e in registry.history()] == [v1]
        assert registry.promote(v2, expected_champion=v1, reason="after the outage").promoted
    finally:
        stop.set()
        thread.join(timeout=60)
