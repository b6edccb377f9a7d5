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
