"""The data memory: every accepted batch is remembered once, snapshots chain compare-and-set."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from data_plane.splits import split_three_way
from evergreen.config import config_from_dict
from model_registry.memory import MemoryIntegrityError, MemoryStore, StaleMemoryError
from tasks.memory import DataMemory
from tests.fixtures_data import CLASSES, feature_names, make_batch


def _cfg(tmp_path: Path, **memory):
    return config_from_dict(
        {
            "home": str(tmp_path / "home"),
            "data": {"features": feature_names(4), "classes": CLASSES},
            "memory": {"replay_capacity": 100, "held_out_per_batch": 30, **memory},
        }
    )


def _remember(memory: DataMemory, cfg, batch_id: str, seed: int) -> DataMemory:
    frame = make_batch(120, seed=seed)
    split = split_three_way(
        frame.assign(batch_id=batch_id),
        [*feature_names(4), "label"],
        select_fraction=cfg.data.select_fraction,
        gate_fraction=cfg.data.gate_fraction,
        salt=cfg.data.split_salt,
    )
    return memory.remember(cfg, batch_id, split, frame)


def test_remember_adds_each_batch_once_and_leaves_the_input_unchanged(tmp_path):
    cfg = _cfg(tmp_path)
    empty = DataMemory()
    one = _remember(empty, cfg, "b1", seed=1)
    assert empty.batches == () and empty.buffer is None  # a new value, not a mutation
    assert one.batches == ("b1",) and len(one.buffer) == one.buffer.n_seen
    assert set(one.held_out) == {"select", "gate"}
    assert one.profile.batches == 1
    again = _remember(one, cfg, "b1", seed=1)
    assert again is one  # a retry after a crash does not double-count
    two = _remember(one, cfg, "b2", seed=2)
    assert two.batches == ("b1", "b2") and len(one.buffer) < len(two.buffer) <= 100
    assert set(two.rows("gate", {"b1"})["batch_id"]) == {"b1"}
    assert len(two.rows("gate", {"b1", "b2"})) == len(two.held_out["gate"])
    assert two.rows("gate", set()).empty


def test_held_out_rows_are_bounded_per_batch(tmp_path):
    cfg = _cfg(tmp_path, held_out_per_batch=5)
    memory = _remember(DataMemory(), cfg, "b1", seed=1)
    assert memory.held_out["gate"].groupby("batch_id").size().max() <= 5


def test_save_and_load_round_trip(tmp_path):
    cfg = _cfg(tmp_path)
    memory = _remember(_remember(DataMemory(), cfg, "b1", seed=1), cfg, "b2", seed=2)
    loaded = DataMemory.load(memory.save(tmp_path / "snap"))
    assert loaded.batches == memory.batches
    assert loaded.profile == memory.profile
    pd.testing.assert_frame_equal(loaded.held_out["gate"], memory.held_out["gate"])
    assert loaded.buffer.stats() == memory.buffer.stats()


def _store(tmp_path: Path) -> MemoryStore:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return MemoryStore(uri, experiment="t-memory", lock_dir=tmp_path / "locks")


def test_store_commits_compare_and_set_and_verifies_downloads(tmp_path):
    cfg, store = _cfg(tmp_path), _store(tmp_path)
    assert store.head() is None
    first = _remember(DataMemory(), cfg, "b1", seed=1).save(tmp_path / "s1")
    ref1 = store.commit(first, parent=None, batch_ids=["b1"])
    assert store.head() == ref1 and ref1.parent is None
    with pytest.raises(StaleMemoryError):  # another flow committed first
        store.commit(first, parent=None, batch_ids=["b1"])
    ref2 = store.commit(first, parent=ref1.run_id, batch_ids=["b1", "b2"])
    assert store.head().run_id == ref2.run_id and ref2.seq > ref1.seq
    loaded = DataMemory.load(store.download(ref2, tmp_path / "dl"), ref2)
    assert loaded.batches == ("b1",) and loaded.ref == ref2
    # tamper with the stored copy: the download refuses it
    [stored] = [p for p in tmp_path.rglob("memory/profile.json") if ref2.run_id in str(p)]
    stored.write_text(stored.read_text().replace("batches", "batchez"))
    with pytest.raises(MemoryIntegrityError, match=r"profile\.json"):
        store.download(ref2, tmp_path / "dl2")
    assert not (tmp_path / "dl2").exists() or not any((tmp_path / "dl2").iterdir())


def test_reading_a_new_head_prunes_old_cached_snapshots(tmp_path):
    import os

    from tasks.memory import memory_store, read_memory

    cfg = _cfg(tmp_path)
    store = memory_store(cfg)
    one = _remember(DataMemory(), cfg, "b1", seed=1)
    ref1 = store.commit(one.save(tmp_path / "s1"), parent=None, batch_ids=["b1"])
    assert read_memory(cfg, ref1).batches == ("b1",)
    cache = cfg.home_path / "cache" / "memory"
    two = _remember(one, cfg, "b2", seed=2)
    ref2 = store.commit(two.save(tmp_path / "s2"), parent=ref1.run_id, batch_ids=["b1", "b2"])
    assert read_memory(cfg, ref2).batches == ("b1", "b2")
    assert {p.name for p in cache.iterdir()} == {ref1.run_id, ref2.run_id}  # ref1 is recent
    os.utime(cache / ref1.run_id, (0, 0))  # untouched for long: nobody is about to read it
    assert read_memory(cfg, ref2).batches == ("b1", "b2")
    assert {p.name for p in cache.iterdir()} == {ref2.run_id}
    assert read_memory(cfg, ref1).batches == ("b1",)  # an old snapshot is downloaded again


def _commit(cfg, store, memory: DataMemory, tmp_path: Path, name: str) -> tuple[DataMemory, int]:
    """What `commit_memory` does after `remember`: save, commit, refer to the stored rows by run
    id, cache; returns the committed memory and the bytes of held-out rows the snapshot stored."""
    from tasks.memory import cache_committed

    snapshot = memory.save(tmp_path / name)
    head = store.head()
    ref = store.commit(snapshot, parent=head and head.run_id, batch_ids=list(memory.batches))
    committed = memory.committed(ref, snapshot)
    cache_committed(cfg, committed)
    rows_bytes = sum(p.stat().st_size for p in (snapshot / "held_out").rglob("*.parquet"))
    return committed, rows_bytes


def test_a_snapshot_stores_the_new_batch_rows_only_and_the_chain_restores_the_memory(tmp_path):
    from tasks.memory import clear_cache, memory_store, read_memory

    cfg = _cfg(tmp_path, held_out_per_batch=12, held_out_max_rows=60)  # the cap cuts from b6 on
    store = memory_store(cfg)
    memory, stored = DataMemory(), []
    for i in range(1, 13):
        memory, rows_bytes = _commit(
            cfg, store, _remember(memory, cfg, f"b{i}", seed=i), tmp_path, f"s{i}"
        )
        stored.append(rows_bytes)
        assert not (tmp_path / f"s{i}" / "held_out-gate.parquet").exists()  # not the whole set
    assert len(memory.held_out["gate"]) == 60  # capped: every batch lost rows to the cap
    assert set(memory.held_out["gate"]["batch_id"]) == {f"b{i}" for i in range(1, 13)}
    # each snapshot stored one batch's rows: the 12th no more than the 2nd (the whole set
    # would be ~5 times as many rows by now)
    assert max(stored[1:]) <= 1.5 * min(stored[1:])
    index = (tmp_path / "s12" / "held_out-gate.json").read_text()
    assert index.count('"run": null') == 1  # b12 here, b1..b11 referred to earlier snapshots
    # a restart: nothing cached, the memory is assembled from the chain in the store
    clear_cache(cfg)
    restored = read_memory(cfg, store.head())
    for role in ("select", "gate"):
        pd.testing.assert_frame_equal(restored.held_out[role], memory.held_out[role])
    assert restored.stored == memory.stored
    # the assembled rows are cached: the next read opens one file per role
    cached = cfg.home_path / "cache" / "memory" / memory.ref.run_id
    assert (cached / "held_out-gate.parquet").exists()
    again = read_memory(cfg, store.head())
    pd.testing.assert_frame_equal(again.held_out["gate"], memory.held_out["gate"])
    # the next batch still refers to the chain after the restart
    _, rows_bytes = _commit(cfg, store, _remember(restored, cfg, "b13", seed=13), tmp_path, "s13")
    assert rows_bytes <= 1.5 * min(stored[1:])


def test_rows_an_earlier_snapshot_stored_are_checked_when_read_back(tmp_path):
    from tasks.memory import clear_cache, memory_store, read_memory

    cfg = _cfg(tmp_path)
    store = memory_store(cfg)
    one, _ = _commit(cfg, store, _remember(DataMemory(), cfg, "b1", seed=1), tmp_path, "s1")
    _commit(cfg, store, _remember(one, cfg, "b2", seed=2), tmp_path, "s2")
    [stored] = [
        p
        for p in (cfg.home_path / "mlartifacts").rglob("held_out/gate/*.parquet")
        if one.ref.run_id in str(p)
    ]
    stored.write_bytes(stored.read_bytes()[::-1])
    clear_cache(cfg)
    with pytest.raises(MemoryIntegrityError, match="held_out/gate"):
        read_memory(cfg, store.head())


def test_a_snapshot_of_an_earlier_release_loads_and_the_next_one_stores_every_batch_once(
    tmp_path,
):
    cfg = _cfg(tmp_path)
    memory = _remember(_remember(DataMemory(), cfg, "b1", seed=1), cfg, "b2", seed=2)
    legacy = tmp_path / "legacy"
    memory.materialize(legacy)
    for path in [*legacy.glob("held_out-*.json"), *legacy.glob("held_out/**/*")]:
        path.unlink() if path.is_file() else None
    loaded = DataMemory.load(legacy)
    pd.testing.assert_frame_equal(loaded.held_out["gate"], memory.held_out["gate"])
    assert loaded.stored == {"select": {}, "gate": {}}
    saved = _remember(loaded, cfg, "b3", seed=3).save(tmp_path / "next")
    assert len(list((saved / "held_out" / "gate").glob("*.parquet"))) == 3
