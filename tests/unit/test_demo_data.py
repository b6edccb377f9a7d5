"""The demo landing zone: real digits, deterministic, drifting, one corrupt batch, no repeats."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits

from demo.timeline import (
    CLASS_9_WEEK,
    CORRUPT_COLUMN,
    DEMO_CLASSES,
    DEMO_FEATURES,
    DemoBatch,
    WriterStyle,
    apply_style,
    build_demo_landing,
    demo_config_dict,
    make_demo_frames,
    transform_digit,
)
from evergreen.config import config_from_dict


@pytest.fixture(scope="module")
def frames():
    return make_demo_frames(seed=0)


@pytest.fixture(scope="module")
def landing(tmp_path_factory) -> tuple[Path, list[DemoBatch]]:
    root = tmp_path_factory.mktemp("landing")
    return root, build_demo_landing(str(root), seed=0)


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_two_builds_are_byte_identical(landing, tmp_path):
    root, batches = landing
    again = build_demo_landing(str(tmp_path / "again"), seed=0)
    assert again == batches
    first, second = _tree_digest(root), _tree_digest(tmp_path / "again")
    assert len(first) >= len(batches)
    assert first == second


def test_another_seed_gives_other_rows(frames):
    other = make_demo_frames(seed=1)
    assert [f.batch.batch_id for f in other] == [f.batch.batch_id for f in frames]
    assert not frames[3].frame.equals(other[3].frame)


def test_batch_ids_are_sorted_unique_dates_matching_the_zone(landing):
    root, batches = landing
    from data_plane.landing import open_landing

    ids = [b.batch_id for b in batches]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"\d{4}-\d{2}-\d{2}", b) for b in ids)
    assert 12 <= len(ids) <= 16
    assert open_landing(str(root)).list_batches() == ids
    assert {b.cadence for b in batches} == {"bootstrap", "daily", "weekly", "monthly"}
    assert batches[0].cadence == "bootstrap" and batches[0].rows >= 400


def test_formats_are_mixed(landing):
    root, batches = landing
    suffixes = [p.suffix for p in root.rglob("*.*")]
    assert {".parquet", ".csv", ".jsonl"} <= set(suffixes)
    assert suffixes.count(".parquet") > len(batches) // 2
    assert [b.fmt for b in batches].count("jsonl") == 1


def test_class_9_only_from_its_arrival_week(frames):
    arrival = next(f.batch.date for f in frames if 9 in set(f.frame["label"]))
    for item in frames:
        labels = set(pd.to_numeric(item.frame["label"]))
        if item.batch.date < arrival:
            assert 9 not in labels, item.batch.batch_id
        elif not item.batch.corrupt:
            assert 9 in labels, item.batch.batch_id
    weeks = {f.batch.date: int(f.batch.description.split()[1]) for f in frames}
    assert weeks[arrival] == CLASS_9_WEEK


def _pixels(frame: pd.DataFrame) -> np.ndarray:
    return frame[DEMO_FEATURES].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)


def test_drift_from_the_original_scans_grows_over_weeks(frames):
    originals = load_digits().data
    distance = [float(np.nanmean(np.abs(_pixels(f.frame) - originals[f.sources]))) for f in frames]
    assert distance[0] == 0.0  # bootstrap: the real scans, untransformed
    rank_corr = pd.Series(distance).corr(pd.Series(range(len(distance))), method="spearman")
    assert rank_corr > 0.85, distance
    early, late = np.mean(distance[1:4]), np.mean(distance[-3:])
    assert late > early + 2.0, distance
    severities = [f.batch.severity for f in frames]
    assert severities == sorted(severities)


def test_exactly_one_corrupt_batch_and_it_is_really_broken(landing, frames):
    root, batches = landing
    corrupt = [b for b in batches if b.corrupt]
    assert len(corrupt) == 1
    from data_plane.landing import open_landing, read_batch

    cfg = config_from_dict(demo_config_dict(str(root), str(root / "home")))
    frame = read_batch(open_landing(str(root)), corrupt[0].batch_id, cfg.data)
    as_numbers = pd.to_numeric(frame[CORRUPT_COLUMN], errors="coerce")
    assert as_numbers.isna().sum() >= 3
    assert (frame["label"] == 11).sum() >= 2
    assert not set(frame["label"]) <= set(DEMO_CLASSES)


def test_valid_batches_read_back_as_clean_digits(landing):
    root, batches = landing
    from data_plane.landing import open_landing, read_batch

    cfg = config_from_dict(demo_config_dict(str(root), str(root / "home")))
    zone = open_landing(str(root))
    for batch in (b for b in batches if not b.corrupt):
        frame = read_batch(zone, batch.batch_id, cfg.data)
        assert len(frame) == batch.rows, batch.batch_id
        pixels = frame[DEMO_FEATURES].to_numpy()
        assert np.issubdtype(pixels.dtype, np.number), batch.batch_id
        assert pixels.min() >= 0 and pixels.max() <= 16
        assert np.array_equal(pixels, np.rint(pixels))
        assert set(frame["label"]) <= set(DEMO_CLASSES)
        assert tuple(sorted(set(frame["label"]))) == batch.classes


def test_no_row_appears_twice_in_the_whole_timeline(frames):
    keys = [row.tobytes() for f in frames for row in _pixels(f.frame)]
    assert len(keys) == sum(f.batch.rows for f in frames)
    assert len(set(keys)) == len(keys)


def test_scans_are_reused_only_under_a_new_transform(frames):
    sources = np.concatenate([f.sources for f in frames])
    assert len(sources) > len(set(sources.tolist()))  # reuse does happen (2,400 rows > 1,797 scans)


def test_transform_stays_in_range_and_force_always_changes_the_scan():
    rng = np.random.default_rng(0)
    scans = load_digits().data[:50]
    for scan in scans:
        out = transform_digit(scan, 1.0, rng)
        assert out.shape == (64,) and out.min() >= 0 and out.max() <= 16
        assert np.array_equal(out, np.rint(out))
        assert not np.array_equal(transform_digit(scan, 0.0, rng, force=True), scan)
    assert np.array_equal(apply_style(scans[0], WriterStyle()), scans[0])


def test_demo_config_validates_with_the_shipped_model_and_training_defaults(tmp_path):
    cfg = config_from_dict(demo_config_dict(str(tmp_path / "landing"), str(tmp_path / "home")))
    assert cfg.data.features == DEMO_FEATURES and len(DEMO_FEATURES) == 64
    assert cfg.data.classes == DEMO_CLASSES == list(range(10))
    defaults = config_from_dict({"data": {"features": ["a"], "label": "y", "classes": [0, 1]}})
    assert cfg.model == defaults.model and cfg.model.family == "mlp"
    for section in ("bootstrap", "weekly", "monthly", "daily"):
        assert getattr(cfg, section).train == getattr(defaults, section).train, section
    assert cfg.data.feature_bounds == {}  # the demo learns from change; nothing is declared
    assert cfg.registry.tracking_uri is None
    # the daily stays the cheapest update: one adapter of at most the weekly's step floor,
    # where the weekly trains one challenger per λ of its grid
    assert cfg.daily.train.steps <= cfg.weekly.train.steps < cfg.monthly.train.steps
    assert len(cfg.weekly.lambda_grid) > 1


@pytest.mark.slow
def test_great_expectations_passes_the_csv_and_jsonl_batches_and_fails_the_corrupt_one(landing):
    from data_plane.gx_suite import ensure_suite
    from data_plane.landing import open_landing, read_batch
    from data_plane.validation import validate_batch

    root, batches = landing
    cfg = config_from_dict(demo_config_dict(str(root), str(root / "home")))
    suite = ensure_suite(cfg.home_path, cfg.data)
    zone = open_landing(str(root))
    by_format = {b.fmt: b for b in batches if not b.corrupt and b.fmt != "parquet"}
    corrupt = next(b for b in batches if b.corrupt)
    for batch in (by_format["csv"], by_format["jsonl"], corrupt):
        report = validate_batch(
            read_batch(zone, batch.batch_id, cfg.data), batch.batch_id, cfg.data, suite
        )
        assert report.success is (not batch.corrupt), (batch.batch_id, report.failures)
    messages = " ".join(str(f) for f in report.failures)
    assert CORRUPT_COLUMN in messages and "11" in messages


@pytest.mark.integration
def test_builds_the_same_timeline_into_s3(monkeypatch, landing):
    """Against moto's real S3-protocol server on loopback: same batches, same bytes."""
    import boto3
    from moto.server import ThreadedMotoServer

    from data_plane.landing import open_landing

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for key, value in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        }.items():
            monkeypatch.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket="demo")
        batches = build_demo_landing("s3://demo/landing", seed=0)
        zone = open_landing("s3://demo/landing")
        root, local_batches = landing
        assert batches == local_batches
        assert zone.list_batches() == [b.batch_id for b in batches]
        for batch in batches:
            for ref in zone.list_files(batch.batch_id):
                with zone.open(ref) as handle:
                    remote = handle.read()
                assert remote == (root / batch.batch_id / ref.name).read_bytes(), ref.name
    finally:
        server.stop()


def test_demo_scores_every_valid_batch_with_the_flows_split(landing, tmp_path):
    """The demo's own scoring path (held-out rows through `frame_to_tensors`) works on the
    landing it builds: every valid batch has gate rows, the corrupt one has none."""
    from demo.run import load_held_out

    root, batches = landing
    cfg = config_from_dict(demo_config_dict(str(root), str(tmp_path)))
    held_out = load_held_out(cfg, batches)
    valid = [b.batch_id for b in batches if not b.corrupt]
    assert list(held_out.gate) == valid
    assert all(len(frame) > 0 for frame in held_out.gate.values())


def test_the_demo_verdict_measures_the_champion_after_flows_that_learn():
    from demo.run import _verdict
    from evergreen.report import TimelineRow

    def row(flow: str, new: float, joint: float) -> TimelineRow:
        return TimelineRow(
            date="2026-10-12",
            flow=flow,
            batch_ids=["2026-10-12"],
            decision="skipped",
            champion_version="3",
            new_accuracy=new,
            retention_accuracy=0.9,
            forgetting=0.0,
            joint_new_accuracy=joint,
        )

    timeline = [row("stream-monitor", 0.60, 0.80), row("weekly-replay", 0.77, 0.80)]
    assert _verdict(timeline).startswith("champion vs joint on each new batch: largest gap +3.0")
