"""Landing zone behaviour. Every `test_zone_*` function takes a `zone` fixture: here a local folder;
tests/integration/test_s3_landing.py runs the very same functions against S3 (moto over HTTP)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from data_plane.arrival import pending_batches
from data_plane.landing import (
    COLUMNS_IN_FILES_ATTR,
    SOURCE_COLUMN,
    BatchReadError,
    LandingZone,
    LocalLandingZone,
    S3LandingZone,
    iter_batch_frames,
    open_landing,
    read_batch,
    write_frame,
)
from tests.fixtures_data import make_batch, make_config, make_empty_batch, snapshot


@pytest.fixture
def zone(tmp_path) -> LandingZone:
    return open_landing(str(tmp_path / "landing"))


# ----------------------------------------------------------------- shared (local + S3) tests


def test_zone_lists_batches_sorted_and_only_with_files(zone: LandingZone) -> None:
    for batch_id in ["2026-11-21T04-00", "2026-11-03", "2026-11-21"]:
        write_frame(zone, batch_id, make_batch(25))
    make_empty_batch(zone, "2026-12-01")
    zone.write_bytes("2026-11-30", "_SUCCESS", b"")  # marker files are not data
    listed = zone.list_batches()
    if isinstance(zone, LocalLandingZone):  # S3 cannot tell a folder marker from a batch
        assert "2026-12-01" not in listed and "2026-11-30" not in listed
    assert [b for b in listed if b not in ("2026-12-01", "2026-11-30")] == [
        "2026-11-03",
        "2026-11-21",
        "2026-11-21T04-00",
    ]
    assert pending_batches(zone, {"2026-11-03"}) == ["2026-11-21", "2026-11-21T04-00"]
    assert pending_batches(zone, []) == ["2026-11-03", "2026-11-21", "2026-11-21T04-00"]


def test_zone_list_files_filters_and_sorts(zone: LandingZone) -> None:
    zone.write_bytes("b1", "z.csv", b"a\n1\n")
    zone.write_bytes("b1", "a.jsonl", b'{"a": 1}\n')
    zone.write_bytes("b1", "notes.txt", b"hello")
    zone.write_bytes("b1", "_SUCCESS", b"")
    zone.write_bytes("b1", "m.parquet", _parquet_bytes(pd.DataFrame({"a": [1]})))
    refs = zone.list_files("b1")
    assert [r.name for r in refs] == ["a.jsonl", "m.parquet", "z.csv"]
    assert all(r.batch_id == "b1" and r.size > 0 and r.uri.endswith(r.name) for r in refs)
    with zone.open(refs[2]) as handle:
        assert handle.read() == b"a\n1\n"
    assert zone.list_files("does-not-exist") == []


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_zone_round_trip_each_format(zone: LandingZone, fmt: str) -> None:
    frame = make_batch(40, seed=3)
    write_frame(zone, "b", frame, fmt=fmt)
    read = read_batch(zone, "b", make_config())
    assert list(read.columns) == [*frame.columns, SOURCE_COLUMN]
    assert set(read[SOURCE_COLUMN]) == {f"part-00000.{fmt}"}
    np.testing.assert_allclose(read[frame.columns].to_numpy(float), frame.to_numpy(float))


def test_zone_streams_in_bounded_chunks_across_files(zone: LandingZone) -> None:
    first, second = make_batch(23, seed=1), make_batch(18, seed=2)
    write_frame(zone, "b", first, fmt="csv")
    write_frame(zone, "b", second, fmt="parquet")
    columns = ["f0", "label"]
    chunks = list(iter_batch_frames(zone, "b", columns, chunk_rows=5))
    assert max(len(c) for c in chunks) <= 5
    assert sum(len(c) for c in chunks) == 41
    assert all(list(c.columns) == [*columns, SOURCE_COLUMN] for c in chunks)
    whole = read_batch(zone, "b", make_config(), chunk_rows=5)
    expected = pd.concat([first, second], ignore_index=True)
    np.testing.assert_allclose(whole[expected.columns].to_numpy(float), expected.to_numpy(float))


def test_zone_missing_columns_are_left_to_validation(zone: LandingZone) -> None:
    write_frame(zone, "b", make_batch(30).drop(columns=["f2"]))
    read = read_batch(zone, "b", make_config())
    assert "f2" not in read.columns and {"f0", "f1", "f3", "label"} <= set(read.columns)


def test_zone_read_errors_name_the_file(zone: LandingZone) -> None:
    zone.write_bytes("b", "good.csv", make_batch(30).to_csv(index=False).encode())
    zone.write_bytes("b", "zz-broken.jsonl", b'{"f0": 1}\n{"f0": \n')
    before = snapshot(zone)
    with pytest.raises(BatchReadError) as info:
        read_batch(zone, "b", make_config())
    error = info.value
    assert (error.batch_id, error.file) == ("b", "zz-broken.jsonl")
    assert "line 2 is not valid JSON" in str(error) and "'zz-broken.jsonl'" in str(error)
    assert snapshot(zone) == before


def test_zone_pagination_beyond_1000_objects(zone: LandingZone) -> None:
    """1,050 files in one batch: S3 returns at most 1,000 keys per ListObjectsV2 page."""
    payload = b"f0,label\n0.5,1\n"
    names = [f"part-{i:05d}.csv" for i in range(1050)]
    _write_many(zone, "big", names, payload)
    write_frame(zone, "small", make_batch(21))
    refs = zone.list_files("big")
    assert [r.name for r in refs] == names
    assert zone.list_batches() == ["big", "small"]
    assert zone.has_files("big") and pending_batches(zone, ["small"]) == ["big"]


# ----------------------------------------------------------------- local-only tests


def test_open_landing_dispatches_on_uri(tmp_path) -> None:
    assert isinstance(open_landing(str(tmp_path)), LocalLandingZone)
    assert isinstance(open_landing(f"file://{tmp_path}"), LocalLandingZone)
    s3 = open_landing("s3://bucket/some/prefix/", s3_client=object())
    assert isinstance(s3, S3LandingZone) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix/")
    with pytest.raises(ValueError, match="use a local path or s3://"):
        open_landing("gs://bucket/prefix")
    with pytest.raises(ValueError, match="no bucket"):
        open_landing("s3:///prefix", s3_client=object())


def test_missing_local_root_is_an_actionable_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist: create it or fix `data.landing`"):
        open_landing(str(tmp_path / "nope")).list_batches()


def test_write_bytes_rejects_path_tricks(zone: LandingZone) -> None:
    for batch_id, name in [
        ("../escape", "a.csv"),
        ("b", "../a.csv"),
        ("b", "sub/a.csv"),
        ("", "a"),
    ]:
        with pytest.raises(ValueError, match="not a safe path component"):
            zone.write_bytes(batch_id, name, b"x")


def test_local_write_is_atomic_and_leaves_no_temp_files(zone: LocalLandingZone) -> None:
    zone.write_bytes("b", "a.csv", b"a\n1\n")
    zone.write_bytes("b", "a.csv", b"a\n2\n")
    assert sorted(p.name for p in (zone.root / "b").iterdir()) == ["a.csv"]
    assert (zone.root / "b" / "a.csv").read_bytes() == b"a\n2\n"


def test_nullable_parquet_columns_come_back_as_numpy(zone: LandingZone) -> None:
    frame = make_batch(25)
    frame["f1"] = pd.array([None, *range(24)], dtype="Int64")
    frame["label"] = frame["label"].astype("Int64")
    write_frame(zone, "b", frame)
    read = read_batch(zone, "b", make_config())
    assert read["f1"].dtype == np.float64 and np.isnan(read["f1"].iloc[0])
    assert read["label"].dtype == np.int64


def test_a_pandas_index_stored_in_parquet_is_not_a_column(zone: LandingZone) -> None:
    # `df.sample(frac=1).to_parquet(path)` stores the shuffled index as `__index_level_0__`;
    # pandas reads it back as the index, so it is not data and must not count as an extra column
    shuffled = make_batch(30).sample(frac=1.0, random_state=0)
    buffer = io.BytesIO()
    shuffled.to_parquet(buffer)
    zone.write_bytes("b", "part-0.parquet", buffer.getvalue())
    named = make_batch(30).rename_axis("row_id")  # a named index: also metadata, not a column
    buffer = io.BytesIO()
    named.to_parquet(buffer)
    zone.write_bytes("c", "part-0.parquet", buffer.getvalue())
    for batch_id in ("b", "c"):
        read = read_batch(zone, batch_id, make_config())
        assert read.attrs[COLUMNS_IN_FILES_ATTR] == sorted(make_batch(1).columns)


def test_json_array_file_gets_a_hint(zone: LandingZone) -> None:
    zone.write_bytes("b", "rows.json", b'[{"f0": 1, "label": 0}]')
    with pytest.raises(BatchReadError, match="expected JSON Lines"):
        read_batch(zone, "b", make_config(n_features=1))


# ----------------------------------------------------------------- helpers


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _write_many(zone: LandingZone, batch_id: str, names: list[str], payload: bytes) -> None:
    if isinstance(zone, S3LandingZone):  # 1,050 PUTs over loopback HTTP: use a few threads
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: zone.write_bytes(batch_id, n, payload), names))
    else:
        for name in names:
            zone.write_bytes(batch_id, name, payload)


def test_write_frame_never_overwrites_an_existing_part(zone: LandingZone) -> None:
    zone.write_bytes("b", "part-00000.csv", b"f0,label\n1,0\n")
    zone.write_bytes("b", "part-00002.csv", b"f0,label\n2,0\n")
    write_frame(zone, "b", pd.DataFrame({"f0": [3.0], "label": [0]}), fmt="csv")
    write_frame(zone, "b", pd.DataFrame({"f0": [4.0], "label": [0]}), fmt="csv")
    assert [r.name for r in zone.list_files("b")] == [f"part-0000{i}.csv" for i in range(4)]
    assert sorted(read_batch(zone, "b", make_config(n_features=1))["f0"]) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="unknown format 'xlsx'"):
        write_frame(zone, "b", pd.DataFrame({"f0": [1]}), fmt="xlsx")
