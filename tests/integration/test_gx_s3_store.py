"""`data.gx_store: s3://…`: the GX stores and Data Docs shared by workers, on moto's S3 server.

The endpoint reaches evergreen only through the standard AWS environment
(`AWS_ENDPOINT_URL_S3`), as on a worker pod; a second Python process with an empty home
stands for a second pod.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from data_plane.gx_suite import ensure_suite, load_suite, write_suite
from data_plane.landing import make_s3_client
from data_plane.validation import validate_batch
from tests.fixtures_data import make_batch, make_config
from tests.integration.test_s3_landing import moto_endpoint  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration

PUBLIC_DOCS = json.dumps({
    "Version": "2012-10-17",
    "Statement": [{
        "Effect": "Allow",
        "Principal": "*",
        "Action": "s3:GetObject",
        "Resource": "arn:aws:s3:::gx-shared/team/gx/uncommitted/data_docs/*",
    }],
})  # fmt: skip

SECOND_POD = """
import json, sys
from pathlib import Path
from data_plane.gx_suite import ensure_suite, load_suite
from data_plane.validation import validate_batch
from tests.fixtures_data import make_batch, make_config

home, store = Path(sys.argv[1]), sys.argv[2]
cfg = make_config(gx_store=store)
suite_file = ensure_suite(home, cfg)
suite = load_suite(suite_file)
report = validate_batch(make_batch(60, seed=8), "second-pod", cfg, suite_file, gx_project=home)
print(json.dumps({"max_rows": [e.max_value for e in suite.expectations
                               if type(e).__name__ == "ExpectTableRowCountToBeBetween"],
                  "success": report.success, "docs": report.statistics.get("data_docs")}))
"""


def _keys(bucket: str, endpoint: str) -> list[str]:
    client = make_s3_client(endpoint_url=endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode("utf-8")


def test_s3_gx_store_is_shared_by_workers(
    tmp_path: Path,
    moto_endpoint: str,  # noqa: F811 - the fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    client = make_s3_client(endpoint_url=moto_endpoint)
    client.create_bucket(Bucket="gx-shared")
    client.put_bucket_policy(Bucket="gx-shared", Policy=PUBLIC_DOCS)  # browsers read the docs
    store = "s3://gx-shared/team/gx"
    cfg = make_config(gx_store=store)

    # pod 1: writes the suite, the operator edits it, a good batch passes
    home = tmp_path / "pod1"
    suite_file = ensure_suite(home, cfg)
    suite = load_suite(suite_file)
    for expectation in suite.expectations:
        if type(expectation).__name__ == "ExpectTableRowCountToBeBetween":
            expectation.max_value = 4321  # the operator's edit, to be seen by pod 2
    write_suite(suite, suite_file)
    report = validate_batch(make_batch(60, seed=3), "good", cfg, suite_file, gx_project=home)
    assert report.success
    docs = report.statistics["data_docs"]
    assert docs.startswith(f"{moto_endpoint}/gx-shared/team/gx/uncommitted/data_docs/")
    assert "good" in docs and "values must never be null" in _get(docs)  # served from S3

    keys = _keys("gx-shared", moto_endpoint)
    assert all(k.startswith("team/gx/") for k in keys)
    assert "team/gx/expectations/evergreen-batch.json" in keys
    assert any(k.startswith("team/gx/checkpoints/evergreen-batch-") for k in keys)
    assert any(k.startswith("team/gx/uncommitted/validations/") for k in keys)
    assert "team/gx/uncommitted/data_docs/local_site/index.html" in keys
    assert not any(k.endswith("great_expectations.yml") for k in keys)  # per pod

    # a corrupt batch is still blocked (the flows quarantine it), and its page is shared too
    corrupt = make_batch(60, seed=4)
    corrupt.loc[0:4, "label"] = 99
    bad = validate_batch(corrupt, "corrupt", cfg, suite_file, gx_project=home)
    assert not bad.success and any("label" in str(f.column) for f in bad.failures)
    page = bad.statistics["data_docs"]
    assert "corrupt" in page and "corrupt" in _get(page)

    # pod 2: a fresh process and an empty home read the same (edited) suite and add a batch
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SECOND_POD), str(tmp_path / "pod2"), store],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    second = json.loads(out.stdout.strip().splitlines()[-1])
    assert second["max_rows"] == [4321] and second["success"]
    index = _get(f"{moto_endpoint}/gx-shared/team/gx/uncommitted/data_docs/local_site/index.html")
    assert all(batch in index for batch in ("good", "corrupt", "second-pod"))
