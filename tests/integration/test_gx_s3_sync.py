"""The sync rules of `data_plane.gx_store` between two workers' `<home>/gx`, on moto's server:
what one pruned is not revived by the other, a local edit is pushed and not overwritten, S3
wins when both changed, and the per-worker `great_expectations.yml` stays local."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_plane.gx_store import S3GxStore
from data_plane.landing import make_s3_client
from tests.integration.test_s3_landing import moto_endpoint  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration

RESULT = "uncommitted/validations/suite/b1/run/suite.json"
SUITE = "expectations/evergreen-batch.json"


def _write(project: Path, relative: str, text: str) -> None:
    (project / relative).parent.mkdir(parents=True, exist_ok=True)
    (project / relative).write_text(text)


def test_two_workers_sync_through_s3(tmp_path: Path, moto_endpoint: str) -> None:  # noqa: F811
    client = make_s3_client(endpoint_url=moto_endpoint)
    client.create_bucket(Bucket="gx-sync")
    a, b = tmp_path / "a", tmp_path / "b"
    pod_a = S3GxStore("s3://gx-sync/gx", client)
    pod_b = S3GxStore("s3://gx-sync/gx", client)

    _write(a, SUITE, "v1")
    _write(a, RESULT, "{}")
    _write(a, "great_expectations.yml", "pod a")
    assert pod_a.push(a) == (2, 0)  # the yml is per worker
    assert (
        pod_b.pull(b) == 2
        and (b / RESULT).is_file()
        and not (b / "great_expectations.yml").exists()
    )
    assert pod_a.push(a) == (0, 0)  # nothing changed: nothing sent

    (a / RESULT).unlink()  # worker a's GX pruned an old result
    assert pod_a.push(a) == (0, 1)
    pod_b.pull(b)
    assert not (b / RESULT).exists()  # not revived by worker b's next push
    assert pod_b.push(b) == (0, 0)

    _write(b, SUITE, "v2 edited on b")  # an operator's edit on worker b
    pod_b.pull(b)
    assert (b / SUITE).read_text() == "v2 edited on b"  # kept, then shared
    assert pod_b.push(b) == (1, 0)
    _write(a, SUITE, "v3 edited on a")  # both sides changed since a's last sync: S3 wins
    pod_a.pull(a)
    assert (a / SUITE).read_text() == "v2 edited on b"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="gx-sync")["Contents"]]
    assert keys == ["gx/" + SUITE]
