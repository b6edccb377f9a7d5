"""The local cache of downloaded model versions (`<home>/cache/versions/<version>`), bounded.

Every flow loads the champion, and merges load their parents, from this cache; a miss downloads
the version (integrity-checked, `Registry.download` writes into a temporary folder and renames
it into place, so a version folder is either complete or absent). Without a bound the cache kept
every champion ever downloaded: one folder per promotion, forever.

The rule, safe for several processes on one host without a lock:

- a read touches the folder's mtime, so mtime is the last use (LRU);
- pruning keeps the versions an alias points at (champion, challenger), the versions the caller
  is using, the `keep_recent` most recently used, and anything used in the last
  `min_age_seconds` (a reader in another process that just found its folder is not pulled from
  under it);
- a pruned folder is first renamed to a hidden name, then removed: a reader sees a version
  folder whole or not at all, and one that loses a folder mid-read anyway (a file or the spec
  missing) downloads it again, once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from continual.checkpoint import CheckpointError
from continual.lineage import ParentSource, remember_local_copy
from evergreen.config import EvergreenConfig
from model_registry.registry import Registry
from tasks.state import ModelState, read_state

KEEP_RECENT = 4  # versions kept beyond the aliased ones: a merge's parents, a rollback target
MIN_AGE_SECONDS = 60.0  # never prune a folder used this recently (another flow may be reading)
STALE_TEMP_SECONDS = 24 * 3600.0  # a download's temporary folder older than this was abandoned


def versions_cache(cfg: EvergreenConfig) -> Path:
    """Where downloaded versions are cached."""
    return cfg.home_path / "cache" / "versions"


def load_cached(cfg: EvergreenConfig, registry: Registry, version: str) -> ModelState:
    """Version `version` from the cache, downloaded on a miss (or when a concurrent prune took
    it mid-read); marks it used."""
    target = versions_cache(cfg) / str(version)
    try:
        return _read(registry, version, target)
    except (FileNotFoundError, CheckpointError):  # pruned by another process mid-read
        shutil.rmtree(target, ignore_errors=True)
        return _read(registry, version, target)


def _read(registry: Registry, version: str, target: Path) -> ModelState:
    if not target.exists():
        registry.download(version, target)
    _touch(target)
    origin = ParentSource(registry.model_name, str(version), registry.tracking_uri, target)
    remember_local_copy(origin)  # its children find it here, not in a second download
    state = read_state(target, version=str(version))
    state.origin = origin
    return state


def _touch(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):  # pruned meanwhile: read_state raises, and
        os.utime(path)  # the caller downloads again


def prune_versions(
    cache: Path,
    *,
    keep: Iterable[str],
    keep_recent: int = KEEP_RECENT,
    min_age_seconds: float = MIN_AGE_SECONDS,
) -> list[str]:
    """Remove cached versions no longer needed (see the module docstring); the ones removed.

    Args:
        cache: the versions cache folder.
        keep: versions never removed (the aliased ones and those the caller is using).
        keep_recent: how many of the most recently used other versions stay.
        min_age_seconds: versions used more recently than this stay whatever their rank.
    """
    if not cache.is_dir():
        return []
    now = time.time()
    kept = {str(v) for v in keep}
    entries = [(_mtime(e), e) for e in cache.iterdir() if e.is_dir()]
    _drop_stale_temporaries([(m, e) for m, e in entries if e.name.startswith(".")], now)
    versions = sorted(
        ((m, e) for m, e in entries if not e.name.startswith(".") and e.name not in kept),
        key=lambda item: item[0],
        reverse=True,
    )
    removed = []
    for mtime, entry in versions[max(keep_recent, 0) :]:
        if now - mtime >= min_age_seconds and _remove(entry):
            removed.append(entry.name)
    return removed


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()  # gone meanwhile: treat as just used, nothing to do


def _drop_stale_temporaries(entries: list[tuple[float, Path]], now: float) -> None:
    """Temporary download folders a killed process left behind (live ones are seconds old)."""
    for mtime, entry in entries:
        if now - mtime >= STALE_TEMP_SECONDS:
            shutil.rmtree(entry, ignore_errors=True)


def _remove(entry: Path) -> bool:
    """Rename out of the way, then delete: readers see the folder whole or not at all."""
    doomed = entry.with_name(f".pruned-{entry.name}-{uuid.uuid4().hex[:8]}")
    try:
        entry.rename(doomed)
    except OSError:  # removed or renamed by another process meanwhile
        return False
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def prune_after_use(cfg: EvergreenConfig, registry: Registry, using: Iterable[str]) -> list[str]:
    """Prune the cache keeping every aliased version and `using` (what this flow just loaded)."""
    return prune_versions(versions_cache(cfg), keep={*registry.aliases().values(), *using})
