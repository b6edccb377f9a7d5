"""The downloaded-versions cache stays bounded, and a pruned version is downloaded again.

Real MLflow registry on the embedded default (SQLite + local artifacts under tmp_path).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from evergreen.config import config_from_dict
from model_registry.registry import Registry
from tasks.merge import load_versions
from tasks.version_cache import load_cached, prune_versions, versions_cache
from tests.checkpoints import tiny_checkpoint

FEATURES = ["f0", "f1", "f2", "f3"]
CLASSES = ["cat", "dog", "eel"]
LONG_AGO = time.time() - 3600


def _folder(cache: Path, name: str, mtime: float) -> Path:
    path = cache / name
    path.mkdir(parents=True)
    (path / "weights").write_bytes(b"x")
    os.utime(path, (mtime, mtime))
    return path


def test_prune_keeps_kept_recent_and_young_versions_and_removes_the_rest(tmp_path):
    cache = tmp_path / "versions"
    for i in range(1, 9):  # version i last used i minutes after LONG_AGO: 8 is the newest
        _folder(cache, str(i), LONG_AGO + 60 * i)
    _folder(cache, "9", time.time())  # just used by another flow
    _folder(cache, ".3.abc", time.time())  # a download in progress
    _folder(cache, ".2.old", LONG_AGO - 2 * 86400)  # a killed download's leftover

    removed = prune_versions(cache, keep={"1", "2"}, keep_recent=3, min_age_seconds=60)

    # kept: 1, 2 (aliased / in use), 9 (young), 8, 7 (with 9, the 3 most recently used)
    assert sorted(removed, key=int) == ["3", "4", "5", "6"]
    assert {p.name for p in cache.iterdir()} == {"1", "2", "7", "8", "9", ".3.abc"}


def test_prune_never_removes_a_recently_used_version_whatever_its_rank(tmp_path):
    cache = tmp_path / "versions"
    for i in range(1, 6):
        _folder(cache, str(i), time.time() - i)
    assert prune_versions(cache, keep=set(), keep_recent=0, min_age_seconds=60) == []
    assert len(list(cache.iterdir())) == 5


def _cfg(tmp_path: Path):
    return config_from_dict(
        {
            "home": str(tmp_path / "home"),
            "data": {"features": FEATURES, "classes": CLASSES},
            "registry": {"name": "cache-test", "experiment": "cache-test"},
        }
    )


def _weights(state) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.model.state_dict().items()}


def test_the_cache_is_bounded_and_merges_find_pruned_parents_again(tmp_path):
    cfg = _cfg(tmp_path)
    registry = Registry.from_config(cfg)
    lineage = {"parent_version": "none", "cadence": "daily", "method": "lora"}
    versions = [
        registry.log_version(
            tiny_checkpoint(tmp_path / f"ckpt{i}", i, FEATURES, CLASSES), lineage=lineage
        ).version
        for i in range(7)
    ]
    registry.promote(versions[0], expected_champion=None, reason="test")
    cache = versions_cache(cfg)

    first = load_versions.fn(cfg, versions)  # a merge of all seven: all cached, none pruned
    assert {p.name for p in cache.iterdir()} == set(versions)
    for i, version in enumerate(versions):  # untouched for an hour since, version 1 longest
        os.utime(cache / version, (LONG_AGO + i, LONG_AGO + i))

    load_versions.fn(cfg, versions[-1:])  # the next load prunes what is not needed
    kept = {p.name for p in cache.iterdir() if not p.name.startswith(".")}
    # the champion, the one in use, and the KEEP_RECENT (4) most recently used of the rest
    assert kept == {versions[0], *versions[2:]}

    pruned = versions[1]
    reloaded = load_versions.fn(cfg, [versions[0], pruned])  # a pruned parent: downloaded again
    assert [s.version for s in reloaded] == [versions[0], pruned]
    expected = _weights(first[1])
    assert all(torch.equal(t, expected[k]) for k, t in _weights(reloaded[1]).items())
    assert (cache / pruned).is_dir()


def test_a_version_pruned_mid_read_is_downloaded_again(tmp_path):
    cfg = _cfg(tmp_path)
    registry = Registry.from_config(cfg)
    lineage = {"parent_version": "none", "cadence": "daily", "method": "lora"}
    version = registry.log_version(
        tiny_checkpoint(tmp_path / "ckpt", 7, FEATURES, CLASSES), lineage=lineage
    ).version
    expected = _weights(load_cached(cfg, registry, version))
    target = versions_cache(cfg) / version
    for path in target.iterdir():  # another process removed the files after exists() passed
        if path.is_file():
            path.unlink()

    state = load_cached(cfg, registry, version)

    assert all(torch.equal(t, expected[k]) for k, t in _weights(state).items())
    assert any(target.iterdir())
