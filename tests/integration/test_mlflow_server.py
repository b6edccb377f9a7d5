"""The registry through a real `mlflow server` on 127.0.0.1 (SQLite and PostgreSQL backends,
proxied artifacts).

Everything the flows do against a remote tracking server: register, promote, concurrent
promotion, rollback, integrity check of artifacts served by the server, the ledger, and
`models:/<name>@champion` loaded in a fresh interpreter that only knows the server's URL.
Run: `pytest -m integration tests/integration/test_mlflow_server.py -s` (prints start-up time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytest
import torch

from continual.checkpoint import load_checkpoint
from continual.classification import class_report
from continual.inference import predict_proba
from model_registry.ledger import Ledger
from model_registry.reconcile import reconcile_champion
from model_registry.registry import Registry
from model_registry.run_record import ClassTable, DatasetRecord, RunRecord
from model_registry.versions import CHECKPOINT_SUBPATH, ArtifactIntegrityError
from tests.checkpoints import tiny_checkpoint
from tests.integration.servers import BIN, background, free_port, postgres_database, wait_http

pytestmark = pytest.mark.integration

FEATURES = ["x0", "x1", "x2"]
CLASSES = [0, 1]


@contextmanager
def backend_store(kind: str, root: Path) -> Iterator[str]:
    """A fresh backend store: a SQLite file, or a new database on the local PostgreSQL
    (the production backend), dropped afterwards. Skips with the reason when PostgreSQL or
    its driver is not there (a laptop), never passes silently."""
    if kind == "sqlite":
        yield f"sqlite:///{root}/server.db"
        return
    with postgres_database() as database:
        if database is None:
            pytest.skip("no PostgreSQL (or no psycopg2) on 127.0.0.1:5432")
        yield database


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp(f"mlflow-server-{request.param}")
    with backend_store(request.param, root) as store:
        yield from _serve(root, store)


def _serve(root: Path, store: str):
    port = free_port()
    command = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        store,
        "--artifacts-destination",
        str(root / "artifacts"),
        "--workers",
        "1",
    ]
    env = {
        **os.environ,
        "MLFLOW_ENABLE_TELEMETRY": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # MLflow 3's job runner adds ~8 huey worker processes that respawn on SIGTERM and slow
        # start-up and shutdown; the registry does not use server-side jobs.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    log = root / "server.log"
    started = time.monotonic()
    with background(command, env=env, log=log, cwd=root) as process:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", 240, process, log)
        startup = time.monotonic() - started
        print(f"\nmlflow server start-up: {startup:.1f} s (until /health answered)")
        yield {"url": url, "root": root, "startup_s": startup}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    paths = [tiny_checkpoint(root / f"c{seed}", seed, FEATURES, CLASSES, 6) for seed in range(3)]
    return paths


def registry_for(server: dict, name: str) -> Registry:
    return Registry(server["url"], name, lock_dir=server["root"] / "locks")


def log(registry: Registry, checkpoint: Path, parent: str | None = None) -> str:
    return registry.log_version(checkpoint, lineage={"parent_version": parent or "none"}).version


def test_register_promote_race_rollback_through_the_server(server, checkpoints, tmp_path):
    registry = registry_for(server, "served")
    v1 = log(registry, checkpoints[0])
    assert registry.get_version(v1).source.startswith("models:/")
    assert registry.promote(v1, expected_champion=None, reason="bootstrap").promoted
    downloaded = registry.download(v1, tmp_path / "v1")
    assert (downloaded / "model.safetensors").is_file()

    challengers = [log(registry, checkpoints[1], v1), log(registry, checkpoints[2], v1)]
    barrier, results = threading.Barrier(2), []

    def promote(version: str) -> None:
        racer = registry_for(server, "served")  # its own client, like another worker
        barrier.wait()
        results.append(racer.promote(version, expected_champion=v1, reason="race"))

    threads = [threading.Thread(target=promote, args=(v,)) for v in challengers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert sorted(r.promoted for r in results) == [False, True]
    winner = next(r.version for r in results if r.promoted)
    assert next(r for r in results if not r.promoted).stale
    assert registry.champion().version == winner

    rolled = registry.rollback(reason="integration")
    assert (rolled.version, rolled.previous) == (v1, winner)
    history = registry_for(server, "served").history()  # a new client reads it back
    assert [(e.action, e.version, e.previous) for e in history] == [
        ("rollback", v1, winner),
        ("promote", winner, v1),
        ("promote", v1, None),
    ]


def test_tampered_artifact_on_the_server_is_refused(server, checkpoints, tmp_path):
    registry = registry_for(server, "tampered")
    v1 = log(registry, checkpoints[0])
    registry.promote(v1, expected_champion=None, reason="bootstrap")
    v2 = log(registry, checkpoints[1], v1)
    uri = registry.client.get_model_version_download_uri("tampered", v2)
    assert uri.startswith("mlflow-artifacts:/")  # served by the server, not a local path
    stored = server["root"] / "artifacts" / urlparse(uri).path.lstrip("/") / CHECKPOINT_SUBPATH
    with (stored / "spec.json").open("a") as handle:
        handle.write(" ")  # still valid JSON, but not the file that was logged
    with pytest.raises(ArtifactIntegrityError, match=r"spec\.json: sha256"):
        registry.promote(v2, expected_champion=v1, reason="gate passed")
    assert registry.champion().version == v1


def test_ledger_through_the_server(server):
    ledger = Ledger(server["url"], experiment="served-ledger")
    ledger.record("daily", "2026-11-21", "failed")
    ledger.record("daily", "2026-11-21", "rejected", details={"reason": "gate"})
    assert Ledger(server["url"], experiment="served-ledger").is_processed("daily", "2026-11-21")
    assert [e.outcome for e in ledger.entries("daily")] == ["rejected", "failed"]


def test_run_record_and_hand_moves_through_the_server(server, checkpoints):
    """Datasets, curves, model-linked metrics and figures go through the REST API and the
    artifact proxy; an alias moved by another client is reconciled into the history."""
    registry = registry_for(server, "explained")
    rows = pd.DataFrame({"x0": [0.1, 0.2], "x1": [1.0, 2.0], "x2": [3.0, 4.0], "label": [0, 1]})
    report = class_report([0, 1], [0, 0], CLASSES)
    metrics = report.metrics("eval.challenger")
    table = ClassTable("challenger", metrics, report.rows(), report.confusion.tolist(), ["0", "1"])
    record = RunRecord(
        params={"daily.lora_r": "8"},
        curves={"train.loss": (1.0, 0.5)},
        datasets=(DatasetRecord("gate", rows, "gate[b1]", "s3://landing/b1", "label"),),
        model_metrics={"gate.new.lcb": -0.02},
        gate_dataset="gate",
        class_tables=(table,),
    )
    v1 = registry.log_version(
        checkpoints[0], lineage={"gate_decision": "pass"}, record=record
    ).version
    registry.promote(v1, expected_champion=None, reason="bootstrap")
    run = registry.client.get_run(registry.get_version(v1).run_id)
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["gate[b1]"]
    model = registry.client.get_logged_model(run.outputs.model_outputs[0].model_id)
    linked = {m.key: m.value for m in model.metrics}
    assert linked["gate.new.lcb"] == -0.02 and linked["eval.challenger.recall.1"] == 0.0
    artifacts = {a.path for a in registry.client.list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/confusion.png" in artifacts

    v2 = log(registry, checkpoints[1], v1)  # never gated
    registry_for(server, "explained").client.set_registered_model_alias("explained", "champion", v2)
    found = reconcile_champion(registry)
    assert found.ungated and registry.history()[0].reason.startswith("UNGATED")


def test_champion_loads_in_a_fresh_process_through_the_server(server, checkpoints, tmp_path):
    registry = registry_for(server, "fresh")
    version = log(registry, checkpoints[2])
    registry.promote(version, expected_champion=None, reason="bootstrap")
    rows = torch.randn(5, len(FEATURES), generator=torch.Generator().manual_seed(1))
    frame = pd.DataFrame(rows.double().numpy(), columns=FEATURES)
    code = (
        "import sys, mlflow, pandas as pd;"
        "m = mlflow.pyfunc.load_model('models:/fresh@champion');"
        "print(m.predict(pd.read_json(sys.stdin, orient='split')).to_json(orient='split'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        input=frame.to_json(orient="split"),
        env={**os.environ, "MLFLOW_TRACKING_URI": server["url"]},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    served = json.loads(done.stdout.strip().splitlines()[-1])
    model, _ = load_checkpoint(checkpoints[2])
    expected = predict_proba(model, rows.float()).argmax(dim=1).tolist()
    assert [row[0] for row in served["data"]] == [CLASSES[i] for i in expected]
