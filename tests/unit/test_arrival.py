"""A batch counts as arrived only when complete: `_SUCCESS`, a verified `_manifest.json`, or no
change for the quiescence window. Every `test_zone_*` function also runs against S3 (moto over
HTTP) from tests/integration/test_s3_landing.py."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from data_plane.arrival import (
    batch_arrivals,
    mark_complete,
    pending_batches,
    write_manifest,
)
from data_plane.landing import LandingZone, open_landing, write_frame
from tests.fixtures_data import make_batch

LATER = 3600.0  # seconds after the writes: every file is quiet by then


@pytest.fixture
def zone(tmp_path) -> LandingZone:
    return open_landing(str(tmp_path / "landing"))


def _why(zone: LandingZone, batch_id: str, **kwargs) -> str:
    return {a.batch_id: a.reason for a in batch_arrivals(zone, **kwargs)}[batch_id]


def test_zone_a_half_uploaded_batch_is_not_pending_until_its_marker(zone: LandingZone) -> None:
    write_frame(zone, "2026-11-21", make_batch(25))  # first of two files
    assert pending_batches(zone, (), quiescence_seconds=600) == []
    write_frame(zone, "2026-11-21", make_batch(25, seed=2))
    assert pending_batches(zone, (), quiescence_seconds=600) == []
    mark_complete(zone, "2026-11-21")
    assert pending_batches(zone, (), quiescence_seconds=600) == ["2026-11-21"]


def test_zone_without_a_marker_a_batch_arrives_after_the_quiet_window(zone: LandingZone) -> None:
    write_frame(zone, "b", make_batch(25))
    assert pending_batches(zone, (), quiescence_seconds=600) == []
    assert "arrival_quiescence_seconds" in _why(zone, "b", quiescence_seconds=600)
    later = time.time() + LATER
    assert pending_batches(zone, (), quiescence_seconds=600, now=later) == ["b"]
    assert pending_batches(zone, ["b"], quiescence_seconds=600, now=later) == []  # processed


def test_zone_a_verified_manifest_makes_a_batch_arrive(zone: LandingZone) -> None:
    write_frame(zone, "b", make_batch(25))
    write_frame(zone, "b", make_batch(30, seed=3), fmt="csv")
    write_manifest(zone, "b")
    assert pending_batches(zone, (), quiescence_seconds=600) == ["b"]


def _manifest(files: dict[str, bytes]) -> bytes:
    entries = [{"name": n, "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()]
    return json.dumps({"files": entries}).encode()


@pytest.mark.parametrize(
    ("announced", "landed", "reason"),
    [
        ({"a.csv": b"f0\n1\n", "b.csv": b"f0\n2\n"}, {"a.csv": b"f0\n1\n"}, "have not landed"),
        ({"a.csv": b"f0\n1\n"}, {"a.csv": b"f0\n1\n", "b.csv": b"f0\n2\n"}, "not in _manifest"),
        ({"a.csv": b"f0\n1\n"}, {"a.csv": b"f0\n9\n"}, "differs from _manifest"),
    ],
    ids=["file-missing", "file-unlisted", "checksum-mismatch"],
)
def test_zone_a_manifest_mismatch_keeps_the_batch_pending_with_the_reason(
    zone: LandingZone, announced, landed, reason
) -> None:
    for name, data in landed.items():
        zone.write_bytes("b", name, data)
    zone.write_bytes("b", "_manifest.json", _manifest(announced))
    # the manifest wins over quiescence: even long after, a mismatch is never read
    assert pending_batches(zone, (), quiescence_seconds=0, now=time.time() + LATER) == []
    assert reason in _why(zone, "b")


def test_zone_an_invalid_manifest_is_reported(zone: LandingZone) -> None:
    zone.write_bytes("b", "a.csv", b"f0\n1\n")
    zone.write_bytes("b", "_manifest.json", b'{"files": [{"name": "a.csv"}]}')
    assert pending_batches(zone, ()) == []
    assert "_manifest.json is not valid" in _why(zone, "b")


def test_zone_markers_alone_are_not_a_batch(zone: LandingZone) -> None:
    mark_complete(zone, "b")
    assert pending_batches(zone, ()) == []
    assert _why(zone, "b") == "no data file yet"


def test_the_landing_zone_is_listed_once_per_discovery(zone: LandingZone, monkeypatch) -> None:
    for batch_id in ("a", "b", "c"):
        write_frame(zone, batch_id, make_batch(25))
        mark_complete(zone, batch_id)
    calls = []
    for method in ("scan", "list_batches", "list_files", "has_files"):
        original = getattr(zone, method)
        monkeypatch.setattr(
            zone, method, lambda *a, _m=method, _o=original: calls.append(_m) or _o(*a)
        )
    assert pending_batches(zone, ()) == ["a", "b", "c"]
    assert calls == ["scan"]


def test_a_listing_signature_follows_the_data_files_only() -> None:
    from data_plane.arrival import listing_signature
    from data_plane.landing import ObjectInfo

    files = [ObjectInfo("part-0.csv", 10, 1.0), ObjectInfo("part-1.csv", 20, 2.0)]
    same = listing_signature(files)
    assert listing_signature(list(reversed(files))) == same  # listing order does not matter
    markers = [ObjectInfo("_SUCCESS", 0, 9.0), ObjectInfo(".part-2.csv.tmp", 5, 9.0)]
    assert listing_signature(files + markers) == same
    assert listing_signature([files[0], ObjectInfo("part-1.csv", 21, 2.0)]) != same  # size
    assert listing_signature([files[0], ObjectInfo("part-1.csv", 20, 3.0)]) != same  # time
    assert listing_signature(files[:1]) != same  # a file removed
