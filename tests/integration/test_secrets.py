"""A planted secret never leaks: flows run through the CLI against an S3 landing zone (moto over
HTTP) with a known AWS_SECRET_ACCESS_KEY; afterwards no byte of it is in the output, the Prefect
database (every log line), the MLflow store (tags, params, metrics), the artifacts or the reports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_plane.arrival import mark_complete
from data_plane.landing import make_s3_client, open_landing, write_frame
from tests.digits_pipeline import digits_frame, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
SECRET = "evgPLANTEDsecret0f3a9c77e1d24b5b8"
KEY_ID = "AKIAEVERGREENPLANTED"


@pytest.fixture
def s3(monkeypatch) -> str:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    yield f"http://{host}:{port}"
    server.stop()


def _cli(root: Path, *args: str) -> str:
    # INFO: the scan below looks for a run's INFO line in the Prefect database, whatever level an
    # earlier in-process `main(["-q", …])` left in this process's environment
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PREFECT_HOME": str(root / "prefect"),
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    done = subprocess.run(
        [sys.executable, "-m", "evergreen.cli", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, f"{args}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def _files_containing(root: Path, needle: bytes) -> list[str]:
    return [
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file() and not path.is_symlink() and needle in path.read_bytes()
    ]


def test_a_planted_secret_appears_nowhere(tmp_path, s3):
    client = make_s3_client()
    client.create_bucket(Bucket="landing")
    zone = open_landing("s3://landing/digits", s3_client=client)
    for batch_id, rows in (("2026-03-01", slice(0, 500)), ("2026-03-02", slice(500, 700))):
        write_frame(zone, batch_id, digits_frame(rows))
        mark_complete(zone, batch_id)
    config = str(write_config(tmp_path, "s3://landing/digits", tmp_path / "home"))
    output = _cli(tmp_path, "run", "bootstrap", "--config", config, "--batch", "2026-03-01")
    output += _cli(tmp_path, "run", "daily-lora", "--config", config)
    output += _cli(tmp_path, "status", "--json", "--config", config)
    output += _cli(tmp_path, "report", "--config", config)
    assert "2026-03-02" in output  # the runs really read the S3 landing zone
    # the scan reaches what matters: the run's log lines (Prefect DB) and tags (MLflow DB)
    logged = _files_containing(tmp_path, b"batch(es) to process")
    assert any(name.startswith("prefect") for name in logged), logged
    assert "home/mlflow.db" in _files_containing(tmp_path, b"evergreen.data_hash")
    for needle in (SECRET, SECRET[:16], KEY_ID):
        assert needle not in output
        assert _files_containing(tmp_path, needle.encode()) == [], needle
