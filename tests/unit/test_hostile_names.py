"""Names from the landing zone cannot escape it: a hostile batch-id matrix (`test_zone_*` run on a
local folder here and on S3 via moto from tests/integration/test_s3_landing.py), symlinks, and
S3 keys with `..` segments. A hostile batch is never pending and never read; the reason names it."""

from __future__ import annotations

import os

import pytest

from data_plane.arrival import batch_arrivals, mark_complete, pending_batches
from data_plane.landing import (
    BatchReadError,
    LandingZone,
    LocalLandingZone,
    S3LandingZone,
    open_landing,
    read_batch,
    write_frame,
)
from tests.fixtures_data import make_batch, make_config

CSV = make_batch(25).to_csv(index=False).encode()

HOSTILE_IDS = {
    "bidi-override": "2026-01-01\u202egpj",
    "fullwidth-digits": "\uff12\uff10\uff12\uff16-01-01",
    "combining-accent": "cafe\u0301",
    "space": "2026 01 01",
    "tab": "2026\t01",
    "leading-dash": "-rf",
    "very-long": "2026-" + "x" * 245,
    "dots-inside": "a..b",
}


def put_raw(zone: LandingZone, relative_key: str, data: bytes) -> None:
    """Write bytes under a name the pipeline's own writers would refuse (an upstream producer)."""
    if isinstance(zone, S3LandingZone):
        zone.client.put_object(Bucket=zone.bucket, Key=zone.prefix + relative_key, Body=data)
    else:
        assert isinstance(zone, LocalLandingZone)
        path = zone.root / relative_key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@pytest.fixture
def zone(tmp_path) -> LandingZone:
    return open_landing(str(tmp_path / "landing"))


@pytest.mark.parametrize("batch_id", HOSTILE_IDS.values(), ids=HOSTILE_IDS.keys())
def test_zone_a_hostile_batch_id_is_reported_never_taken_or_read(
    zone: LandingZone, batch_id: str
) -> None:
    write_frame(zone, "2026-01-02", make_batch(25))
    mark_complete(zone, "2026-01-02")
    put_raw(zone, f"{batch_id}/part-0.csv", CSV)
    put_raw(zone, f"{batch_id}/_SUCCESS", b"")
    assert pending_batches(zone, ()) == ["2026-01-02"]
    reasons = {a.batch_id: a.reason for a in batch_arrivals(zone)}
    assert "not a safe batch id" in reasons[batch_id]
    with pytest.raises((ValueError, BatchReadError)):
        read_batch(zone, batch_id, make_config())
    with pytest.raises(ValueError, match="not a safe path component"):
        zone.write_bytes(batch_id, "part-1.csv", CSV)


@pytest.mark.parametrize("batch_id", ["..", "../outside", "/etc", "a/../../b", ""])
def test_zone_path_tricks_in_a_requested_batch_id_read_nothing(
    zone: LandingZone, batch_id: str
) -> None:
    write_frame(zone, "2026-01-02", make_batch(25))
    with pytest.raises((ValueError, BatchReadError)):
        read_batch(zone, batch_id, make_config())


def test_zone_s3_keys_with_dot_dot_segments_stay_literal(zone: LandingZone) -> None:
    if not isinstance(zone, S3LandingZone):
        pytest.skip("S3 keys are literal strings; a local folder cannot be named '..'")
    put_raw(zone, "../escape/part-0.csv", CSV)
    put_raw(zone, "../escape/_SUCCESS", b"")
    put_raw(zone, "good/../../x.csv", CSV)
    write_frame(zone, "good", make_batch(25))
    mark_complete(zone, "good")
    assert pending_batches(zone, ()) == ["good"]
    assert [ref.name for ref in zone.list_files("good")] == ["part-00000.parquet"]


def test_symlinked_batches_and_files_are_not_followed(tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_bytes(CSV)
    (outside / "_SUCCESS").touch()
    zone = open_landing(str(tmp_path / "landing"))
    write_frame(zone, "2026-01-02", make_batch(25))
    mark_complete(zone, "2026-01-02")
    os.symlink(outside, tmp_path / "landing" / "2026-01-03")  # a batch that is a link
    os.symlink(outside / "secret.csv", tmp_path / "landing" / "2026-01-02" / "zz.csv")
    assert pending_batches(zone, ()) == ["2026-01-02"]
    assert [ref.name for ref in zone.list_files("2026-01-02")] == ["part-00000.parquet"]
    assert zone.list_files("2026-01-03") == []
    with pytest.raises(FileNotFoundError):
        zone.read_bytes("2026-01-02", "zz.csv")
    assert len(read_batch(zone, "2026-01-02", make_config())) == 25
