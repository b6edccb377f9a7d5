"""Hold-out split, content hash and retention set: deterministic, order-invariant, bounded."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_plane.splits import (
    _equal_shares,
    _proportional,
    content_hash,
    row_hashes,
    split_holdout,
    split_three_way,
    update_retention,
)
from tests.fixtures_data import make_batch, make_config

COLUMNS = ["f0", "f1", "f2", "f3", "label"]


def test_row_hashes_are_stable_and_dtype_insensitive() -> None:
    frame = pd.DataFrame({"x": [1, 2, 3], "s": ["a", "b", None]})
    hashes = row_hashes(frame, ["x", "s"])
    assert hashes.dtype == np.uint64 and len(set(hashes.tolist())) == 3
    as_float = frame.assign(x=frame["x"].astype(float), s=frame["s"].astype(object))
    np.testing.assert_array_equal(row_hashes(as_float, ["x", "s"]), hashes)
    reversed_rows = frame.iloc[::-1]
    np.testing.assert_array_equal(row_hashes(reversed_rows, ["x", "s"]), hashes[::-1])
    assert row_hashes(frame.assign(x=[1, 2, 4]), ["x", "s"])[2] != hashes[2]
    with pytest.raises(KeyError, match=r"\['nope'\]"):
        row_hashes(frame, ["nope"])


def test_split_is_deterministic_and_order_invariant() -> None:
    frame = make_batch(4000, seed=1)
    train, holdout = split_holdout(frame, COLUMNS, 0.25)
    assert len(train) + len(holdout) == len(frame)
    assert set(train.index).isdisjoint(holdout.index)
    assert abs(len(holdout) / len(frame) - 0.25) < 0.03
    shuffled = frame.sample(frac=1.0, random_state=7)
    _, holdout2 = split_holdout(shuffled, COLUMNS, 0.25)
    assert set(holdout2.index) == set(holdout.index)
    assert set(split_holdout(frame, COLUMNS, 0.25)[1].index) == set(holdout.index)
    salted = split_holdout(frame, COLUMNS, 0.25, salt="other")[1]
    assert 0.1 < len(set(salted.index) & set(holdout.index)) / len(holdout) < 0.5


def test_split_keeps_exact_duplicates_together() -> None:
    frame = make_batch(300, seed=2)
    doubled = pd.concat([frame, frame], ignore_index=True)
    train, holdout = split_holdout(doubled, COLUMNS, 0.3)
    held = set(row_hashes(holdout, COLUMNS).tolist())
    assert held.isdisjoint(row_hashes(train, COLUMNS).tolist())
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        split_holdout(frame, COLUMNS, 1.0)


def test_content_hash_ignores_order_and_sees_every_value() -> None:
    frame = make_batch(200, seed=3)
    digest = content_hash(frame, COLUMNS)
    assert len(digest) == 64
    assert content_hash(frame.sample(frac=1.0, random_state=1), COLUMNS) == digest
    changed = frame.copy()
    changed.loc[137, "f2"] += 1e-9
    assert content_hash(changed, COLUMNS) != digest
    assert content_hash(frame.iloc[:-1], COLUMNS) != digest
    assert content_hash(frame, COLUMNS[:-1]) != digest


def _holdout(batch: int, n: int = 300) -> pd.DataFrame:
    frame = make_batch(n, seed=100 + batch)
    frame["_source_file"] = "part-00000.parquet"
    return frame


def test_retention_takes_a_stratified_bounded_sample_per_batch() -> None:
    holdout = _holdout(0)
    holdout.loc[holdout.index[:3], "label"] = 3  # a rare class must stay represented
    retention = update_retention(
        None, holdout, batch_id="2026-11-01", label="label", per_batch=60, max_rows=1000
    )
    assert len(retention) == 60
    assert set(retention["batch_id"]) == {"2026-11-01"} and "_source_file" not in retention
    expected = holdout["label"].value_counts() / len(holdout) * 60
    counts = retention["label"].value_counts()
    assert counts.get(3, 0) >= 1
    for label in (0, 1, 2):
        assert abs(counts[label] - expected[label]) <= 1.5
    again = update_retention(
        None,
        holdout.sample(frac=1.0, random_state=3),
        batch_id="2026-11-01",
        label="label",
        per_batch=60,
        max_rows=1000,
    )
    assert content_hash(again, [*COLUMNS, "batch_id"]) == content_hash(
        retention, [*COLUMNS, "batch_id"]
    )


def test_retention_stays_bounded_and_keeps_every_batch() -> None:
    retention = None
    for batch in range(12):
        retention = update_retention(
            retention,
            _holdout(batch),
            batch_id=f"2026-11-{batch + 1:02d}",
            label="label",
            per_batch=50,
            max_rows=240,
        )
        assert len(retention) <= 240
    assert retention is not None and len(retention) == 240
    per_batch = retention["batch_id"].value_counts()
    assert len(per_batch) == 12 and per_batch.max() - per_batch.min() <= 1
    for _, group in retention.groupby("batch_id"):
        assert group["label"].nunique() == 3  # stratified within each batch
    assert list(retention["batch_id"]) == sorted(retention["batch_id"])


def test_retention_rerun_of_a_batch_replaces_its_rows() -> None:
    first = update_retention(
        None, _holdout(0), batch_id="b1", label="label", per_batch=40, max_rows=500
    )
    second = update_retention(
        first, _holdout(1), batch_id="b2", label="label", per_batch=40, max_rows=500
    )
    rerun = update_retention(
        second, _holdout(1), batch_id="b2", label="label", per_batch=40, max_rows=500
    )
    pd.testing.assert_frame_equal(rerun, second)
    with pytest.raises(KeyError, match="'target'"):
        update_retention(None, _holdout(0), batch_id="b", label="target", per_batch=5, max_rows=5)


def test_retention_with_more_batches_than_rows_keeps_the_latest() -> None:
    retention = None
    for batch in range(6):
        retention = update_retention(
            retention,
            _holdout(batch, 30),
            batch_id=f"b{batch}",
            label="label",
            per_batch=5,
            max_rows=4,
        )
    assert retention is not None and sorted(retention["batch_id"]) == ["b2", "b3", "b4", "b5"]


@pytest.mark.parametrize("seed", range(20))
def test_allocation_helpers_against_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    caps = rng.integers(1, 40, size=rng.integers(1, 8))
    n = int(rng.integers(0, caps.sum() + 5))
    quota = _proportional(n, caps)
    assert quota.sum() == min(n, caps.sum()) and np.all(quota <= caps) and np.all(quota >= 0)
    if n >= len(caps):
        assert np.all(quota >= 1)
    shares = _equal_shares(n, caps)
    assert shares.sum() == min(n, caps.sum()) and np.all(shares <= caps)
    # water-filling: a group below the largest share is below only because it is exhausted
    assert np.all((shares == caps) | (shares >= shares.max() - 1))


@pytest.mark.parametrize(("rows", "hinted"), [(600, False), (30_000, True)])
def test_a_batch_far_larger_than_the_memory_keeps_gets_a_fraction_hint(rows, hinted) -> None:
    """Held-out rows never train: when a batch holds out ten times what the memory keeps, the
    log suggests fractions that train on the rest; a usual batch gets no hint."""
    from evergreen.config import EvergreenConfig
    from tasks.validate import held_out_hint

    data = make_config().model_dump()
    cfg = EvergreenConfig(data=data, memory={"held_out_per_batch": 400})
    frame = make_batch(rows, seed=2)
    split = split_three_way(frame, COLUMNS, select_fraction=0.1, gate_fraction=0.25, salt="s")
    hint = held_out_hint(cfg, "b", split)
    assert (hint is not None) == hinted
    if hinted:
        assert "select_fraction" in hint and "0.013" in hint, hint
