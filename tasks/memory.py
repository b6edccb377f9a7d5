"""The data memory every flow reads and extends: replay buffer, held-out rows, data profile.

See `model_registry.memory` for why the memory is not part of a model version. Here it is a
plain value: `DataMemory.remember` returns a new memory that also holds one accepted batch
(adding a batch it already holds returns it unchanged), and `commit_memory` appends it to the
chain in MLflow, re-applying the batches to a newer head if another flow committed first.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from continual.replay import ReservoirBuffer
from data_plane.landing import data_columns
from data_plane.profile import DataProfile
from data_plane.splits import ThreeWaySplit, row_hashes, update_retention
from evergreen.config import EvergreenConfig
from model_registry.memory import MemoryRef, MemoryStore, StaleMemoryError
from model_registry.pyfunc_model import file_sha256
from tasks.common import encode_labels, text_ids

BATCH_COLUMN = "batch_id"
ROLES = ("select", "gate")
_COMMIT_ATTEMPTS = 5
CACHE_MIN_AGE_SECONDS = 60.0
ROWS_FOLDER = "held_out"
INDEX_FORMAT = 1

# Reads a file another snapshot stored: (run id, path in its snapshot, sha256) → local path.
Fetch = Callable[[str, str, str], Path]


@dataclass(frozen=True)
class StoredRows:
    """Where one batch's held-out rows of one role are stored, and which of them are held.

    A batch's rows are written once, by the snapshot that first remembered the batch; later
    snapshots refer to that file and list the positions still held (the cap of
    `memory.held_out_max_rows` only ever drops rows). So a snapshot stores the new batch's
    rows, not the whole memory again.

    Attributes:
        run: the snapshot run that stored the file.
        file: its path inside that snapshot (`held_out/<role>/<name>.parquet`).
        sha256: the file's hash, checked when it is read through a later snapshot.
        n_rows: rows in the file.
        rows: positions in the file that the memory holds, in order (None: all of them).
    """

    run: str
    file: str
    sha256: str
    n_rows: int
    rows: tuple[int, ...] | None = None

    def positions(self) -> np.ndarray:
        return np.arange(self.n_rows) if self.rows is None else np.asarray(self.rows, dtype=int)


@dataclass(frozen=True)
class DataMemory:
    """Everything accepted data left behind (one snapshot of the chain).

    Attributes:
        batches: accepted batch ids, in the order they were remembered.
        buffer: reservoir of training rows over every accepted batch (None before the first).
        held_out: role ("select", "gate") → held-out rows of every batch (bounded, stratified,
            with a `batch_id` column). Gate rows are the retention set the promotion gate
            scores; select rows choose (LoRA keep/discard, λ), never the gate's.
        profile: accepted value ranges and class counts, for validation.
        ref: the committed snapshot this memory is (None: not committed yet).
        stored: role → batch → where its held-out rows are already stored (`StoredRows`);
            a batch not listed is stored by the next snapshot.
    """

    batches: tuple[str, ...] = ()
    buffer: ReservoirBuffer | None = None
    held_out: dict[str, pd.DataFrame] = field(default_factory=dict)
    profile: DataProfile = field(default_factory=DataProfile)
    ref: MemoryRef | None = None
    stored: dict[str, dict[str, StoredRows]] = field(default_factory=dict)

    def rows(self, role: str, batch_ids: set[str] | frozenset[str]) -> pd.DataFrame:
        """Held-out rows of `role` from the given batches (empty frame if none)."""
        frame = self.held_out.get(role)
        if frame is None or frame.empty:
            return pd.DataFrame()
        return frame[frame[BATCH_COLUMN].astype(str).isin(batch_ids)]

    def remember(
        self, cfg: EvergreenConfig, batch_id: str, split: ThreeWaySplit, frame: pd.DataFrame
    ) -> DataMemory:
        """A memory that also holds `batch_id` (self unchanged; no-op if already held).

        Args:
            cfg: the pipeline config (memory sizes, columns, classes).
            batch_id: the accepted batch.
            split: its rows by role.
            frame: the whole accepted batch (for the profile).
        """
        if batch_id in self.batches:
            return self
        mem = cfg.memory
        buffer = copy.deepcopy(self.buffer) if self.buffer is not None else None
        if not split.train.empty:
            X = replay_inputs(cfg, split.train)
            if buffer is None:
                buffer = ReservoirBuffer(
                    mem.replay_capacity,
                    X.shape[1],
                    policy=mem.replay_policy,
                    seed=mem.seed,
                    dtype=X.dtype,
                )
            buffer.add(X, encode_labels(split.train[cfg.data.label], cfg.data.classes), batch_id)
        held_out = dict(self.held_out)
        stored = dict(self.stored)
        for role in ROLES:
            part = getattr(split, role)
            if part.empty:
                continue
            held_out[role] = update_retention(
                held_out.get(role),
                part.drop(columns=[BATCH_COLUMN], errors="ignore"),
                batch_id=batch_id,
                label=cfg.data.label,
                per_batch=mem.held_out_per_batch,
                max_rows=mem.held_out_max_rows,
            )
            stored[role] = _still_stored(
                self.held_out.get(role), held_out[role], self.stored.get(role, {})
            )
        profile = self.profile.updated(
            frame,
            cfg.data.features,
            cfg.data.label,
            batch_id=batch_id,
            columns=data_columns(cfg.data),
        )
        return DataMemory((*self.batches, batch_id), buffer, held_out, profile, None, stored)

    def save(self, directory: Path) -> Path:
        """Write the snapshot layout (docs/CONTRACTS.md) into `directory`.

        Held-out rows: `held_out-<role>.json` lists every batch's stored rows; the rows of
        batches not stored yet are written under `held_out/<role>/` (listed with run null:
        "this snapshot"). Use `materialize` for a folder that `load` reads without the store.
        """
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "batches.txt").write_text("\n".join(self.batches) + "\n")
        (directory / "profile.json").write_text(self.profile.to_json())
        if self.buffer is not None:
            self.buffer.save(directory / "replay")
        for role, frame in self.held_out.items():
            _save_rows(directory, role, frame, self.stored.get(role, {}))
        return directory

    def materialize(self, directory: Path) -> Path:
        """`save` plus every role's held-out rows in one file (`held_out-<role>.parquet`),
        so `load` needs nothing else: the local cache of a snapshot."""
        self.save(directory)
        for role, frame in self.held_out.items():
            frame.to_parquet(directory / f"held_out-{role}.parquet", index=False)
        return directory

    def committed(self, ref: MemoryRef, directory: Path) -> DataMemory:
        """This memory as the snapshot `ref`, which was committed from `save(directory)`: the
        rows it stored are now referred to by run id."""
        stored = {role: _read_index(directory, role, ref.run_id) for role in self.held_out}
        return replace(self, ref=ref, stored=stored)

    @classmethod
    def load(
        cls, directory: Path, ref: MemoryRef | None = None, fetch: Fetch | None = None
    ) -> DataMemory:
        """Read a snapshot written by `save` or `materialize` (or an earlier release, which
        stored every role's rows in `held_out-<role>.parquet`).

        Args:
            directory: the snapshot folder.
            ref: the snapshot it is (resolves "this snapshot" in the row index).
            fetch: reads rows another snapshot stored; needed unless the folder holds
                `held_out-<role>.parquet` or every row it lists.

        Raises:
            FileNotFoundError: rows stored elsewhere and no `fetch`.
        """
        batches = tuple(b for b in (directory / "batches.txt").read_text().splitlines() if b)
        replay = directory / "replay"
        run = ref.run_id if ref else None
        held_out, stored = {}, {}
        for role in ROLES:
            index = _read_index(directory, role, run)
            whole = directory / f"held_out-{role}.parquet"
            if whole.exists():
                held_out[role] = pd.read_parquet(whole)
            elif (directory / f"held_out-{role}.json").exists():
                held_out[role] = _assemble_rows(directory, role, run, fetch)
            else:
                continue
            stored[role] = index
        return cls(
            batches=batches,
            buffer=ReservoirBuffer.load(replay) if replay.exists() else None,
            held_out=held_out,
            profile=DataProfile.from_json((directory / "profile.json").read_text()),
            ref=ref,
            stored=stored,
        )


def _identity(frame: pd.DataFrame) -> np.ndarray:
    return row_hashes(frame, [c for c in frame.columns if c != BATCH_COLUMN])


def _still_stored(
    before: pd.DataFrame | None, after: pd.DataFrame, stored: dict[str, StoredRows]
) -> dict[str, StoredRows]:
    """`stored` for the rows `after` holds: a batch whose rows in `after` are a subsequence
    of its rows in `before` (the retention cap only drops rows, in order) keeps its file with
    fewer positions; a batch that cannot be matched is dropped, so the next snapshot stores it
    anew (always correct, only bigger)."""
    if before is None or before.empty or not stored:
        return {}
    old_groups = _batch_positions(before)
    new_groups = _batch_positions(after)
    old_hash, new_hash = _identity(before), _identity(after)
    kept: dict[str, StoredRows] = {}
    for batch, positions in new_groups.items():
        entry, old_positions = stored.get(batch), old_groups.get(batch)
        if entry is None or old_positions is None or len(old_positions) != len(entry.positions()):
            continue
        match = _subsequence(new_hash[positions], old_hash[old_positions])
        if match is None:
            continue
        rows = entry.positions()[match]
        full = len(rows) == entry.n_rows and bool(np.all(rows == np.arange(entry.n_rows)))
        kept[batch] = replace(entry, rows=None if full else tuple(int(r) for r in rows))
    return kept


def _batch_positions(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    groups = frame[BATCH_COLUMN].astype(str).groupby(frame[BATCH_COLUMN].astype(str), sort=False)
    return {str(k): np.asarray(v) for k, v in groups.indices.items()}


def _subsequence(needles: np.ndarray, haystack: np.ndarray) -> np.ndarray | None:
    """Positions in `haystack` of `needles` as an in-order subsequence (leftmost), else None."""
    found, start = [], 0
    for value in needles:
        hits = np.flatnonzero(haystack[start:] == value)
        if hits.size == 0:
            return None
        start += int(hits[0])
        found.append(start)
        start += 1
    return np.asarray(found, dtype=int)


def _rows_file(role: str, batch_id: str) -> str:
    """A tag-safe file name for a batch id (any string), unique by its hash."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", batch_id)[:80]
    digest = hashlib.sha256(batch_id.encode("utf-8")).hexdigest()[:10]
    return f"{ROWS_FOLDER}/{role}/{safe}-{digest}.parquet"


def _save_rows(
    directory: Path, role: str, frame: pd.DataFrame, stored: dict[str, StoredRows]
) -> None:
    """Write the row index of `role`, and the rows of batches not stored yet."""
    entries = []
    if not frame.empty:
        batch = frame[BATCH_COLUMN].astype(str)
        starts = batch.ne(batch.shift()).to_numpy()
        if int(starts.sum()) != batch.nunique():  # not one run per batch: cannot refer by batch
            frame.to_parquet(directory / f"held_out-{role}.parquet", index=False)
            return
    for batch_id, positions in _batch_positions(frame).items():
        entry = stored.get(batch_id)
        if entry is not None:
            entries.append({"batch": batch_id, **entry.__dict__})
            continue
        relative = _rows_file(role, batch_id)
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.iloc[positions].to_parquet(path, index=False)
        sha = file_sha256(path)
        new = {"run": None, "file": relative, "sha256": sha, "n_rows": len(positions)}
        entries.append({"batch": batch_id, **new, "rows": None})
    index = {"format": INDEX_FORMAT, "columns": [str(c) for c in frame.columns], "batches": entries}
    (directory / f"held_out-{role}.json").write_text(json.dumps(index) + "\n")


def _index_entries(directory: Path, role: str) -> list[dict[str, Any]]:
    path = directory / f"held_out-{role}.json"
    if not path.exists():
        return []
    index = json.loads(path.read_text())
    if index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: unknown row index format {index.get('format')!r}")
    return list(index["batches"])


def _read_index(directory: Path, role: str, run: str | None) -> dict[str, StoredRows]:
    """The stored rows listed in `held_out-<role>.json`; "this snapshot" is `run` (None: left
    out, so a later save stores those rows itself)."""
    stored = {}
    for item in _index_entries(directory, role):
        owner = item["run"] or run
        if owner is None:
            continue
        rows = item["rows"]
        stored[str(item["batch"])] = StoredRows(
            run=str(owner),
            file=str(item["file"]),
            sha256=str(item["sha256"]),
            n_rows=int(item["n_rows"]),
            rows=None if rows is None else tuple(int(r) for r in rows),
        )
    return stored


def _assemble_rows(
    directory: Path, role: str, run: str | None, fetch: Fetch | None
) -> pd.DataFrame:
    """The held-out rows of `role` from the files the index lists (here or in earlier
    snapshots, read through `fetch`)."""
    index = json.loads((directory / f"held_out-{role}.json").read_text())
    parts = []
    for item in index["batches"]:
        local = directory / str(item["file"])
        if item["run"] is not None and item["run"] != run:
            if fetch is None:
                raise FileNotFoundError(
                    f"{directory}: rows of batch {item['batch']} are stored by snapshot "
                    f"{item['run']}; read the snapshot through the memory store"
                )
            local = fetch(str(item["run"]), str(item["file"]), str(item["sha256"]))
        frame = pd.read_parquet(local)
        rows = item["rows"]
        parts.append(frame if rows is None else frame.iloc[list(rows)])
    if not parts:
        return pd.DataFrame(columns=index["columns"])
    return pd.concat(parts, ignore_index=True)


def replay_inputs(cfg: EvergreenConfig, train: pd.DataFrame) -> torch.Tensor:
    """What the replay buffer stores of training rows: float features, or for text models the
    token ids (`model.max_length` wide) of the text column, tokenized once on arrival."""
    if cfg.data.text:
        if not cfg.model.hf_path:
            raise ValueError("data.text is set but model.hf_path is not: text needs its tokenizer")
        return text_ids(train[cfg.data.text], cfg.model.hf_path, cfg.model.max_length)
    return torch.from_numpy(train[cfg.data.features].to_numpy("float32", copy=True))


def memory_store(cfg: EvergreenConfig) -> MemoryStore:
    return MemoryStore(
        cfg.tracking_uri,
        experiment=f"{cfg.registry.experiment}-memory",
        artifact_location=cfg.artifact_location,
        lock_name=f"{cfg.registry.name}-memory",
        lock_dir=cfg.home_path / "locks",
    )


def read_memory(cfg: EvergreenConfig, ref: MemoryRef | None) -> DataMemory:
    """The snapshot `ref` (cached under `<home>/cache/memory/<run>`), or an empty memory.

    A snapshot refers to held-out rows earlier snapshots stored; the first read assembles them
    (one small download per batch) and caches the assembled rows, so later reads open one file
    per role.
    """
    if ref is None:
        return DataMemory()
    cache = cfg.home_path / "cache" / "memory"
    target = cache / ref.run_id
    try:
        memory = _read_cached(cfg, ref, target)
    except FileNotFoundError:  # pruned by another process between exists() and load
        shutil.rmtree(target, ignore_errors=True)
        memory = _read_cached(cfg, ref, target)
    prune_cache(cache, keep=ref.run_id)
    return memory


def _read_cached(cfg: EvergreenConfig, ref: MemoryRef, target: Path) -> DataMemory:
    store = memory_store(cfg)
    if not target.exists():
        store.download(ref, target)
    assembled = [r for r in ROLES if not (target / f"held_out-{r}.parquet").exists()]
    with tempfile.TemporaryDirectory(prefix="evergreen-rows-") as tmp:
        fetched = Path(tmp)

        def fetch(run: str, relative: str, sha256: str) -> Path:
            return store.fetch_file(run, relative, sha256, fetched / run)

        memory = DataMemory.load(target, ref, fetch)
    for role in assembled:  # cache the assembled rows: the next read opens one file
        if role in memory.held_out:
            _write_atomic_parquet(memory.held_out[role], target / f"held_out-{role}.parquet")
    return memory


def _write_atomic_parquet(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def cache_committed(cfg: EvergreenConfig, memory: DataMemory) -> None:
    """Put a memory this process just committed into the local cache (as `read_memory` would
    leave it), so the next flow reads it without downloading or assembling anything."""
    if memory.ref is None:
        return
    target = cfg.home_path / "cache" / "memory" / memory.ref.run_id
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        memory.materialize(tmp)
        tmp.rename(target)
    except OSError:  # another process cached it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)


def prune_cache(cache: Path, *, keep: str, min_age_seconds: float = CACHE_MIN_AGE_SECONDS) -> int:
    """Remove cached snapshots other than `keep` untouched for `min_age_seconds`; how many.

    Every accepted batch makes a new head, and the old ones are never read again by the flows:
    without this the cache holds a full copy of every snapshot ever committed. The age floor
    spares a snapshot another flow may have just downloaded (a reader that loses one anyway
    downloads it again).
    """
    if not cache.is_dir():
        return 0
    cutoff = time.time() - min_age_seconds
    removed = 0
    for entry in cache.iterdir():
        if entry.name != keep and entry.is_dir() and entry.stat().st_mtime < cutoff:
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


@task(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=2), cache_policy=NO_CACHE)
def load_memory(cfg: EvergreenConfig) -> DataMemory:
    """The latest snapshot of the pipeline's data memory (empty before the first batch)."""
    return read_memory(cfg, memory_store(cfg).head())


Remembered = tuple[str, ThreeWaySplit, pd.DataFrame]


@task(cache_policy=NO_CACHE, timeout_seconds=900)
def commit_memory(
    cfg: EvergreenConfig, memory: DataMemory, accepted: list[Remembered]
) -> DataMemory:
    """Add the accepted batches to the memory and commit it (compare-and-set, retried)."""
    store = memory_store(cfg)
    for _ in range(_COMMIT_ATTEMPTS):
        updated = memory
        for batch_id, split, frame in accepted:
            updated = updated.remember(cfg, batch_id, split, frame)
        if updated is memory:
            return memory  # every batch was already remembered
        parent = memory.ref.run_id if memory.ref else None
        with tempfile.TemporaryDirectory(prefix="evergreen-memory-") as tmp:
            snapshot = updated.save(Path(tmp) / "snapshot")
            try:
                ref = store.commit(snapshot, parent=parent, batch_ids=list(updated.batches))
            except StaleMemoryError as stale:
                get_run_logger().info("%s; re-applying to the new head", stale)
                memory = read_memory(cfg, store.head())
                continue
            committed = updated.committed(ref, snapshot)
        cache_committed(cfg, committed)
        get_run_logger().info(
            "memory: %d batches (+%s), %d replay rows",
            len(updated.batches),
            [b for b in updated.batches if b not in memory.batches],
            len(updated.buffer) if updated.buffer is not None else 0,
        )
        return committed
    raise StaleMemoryError(f"memory kept moving during {_COMMIT_ATTEMPTS} attempts; rerun the flow")


def clear_cache(cfg: EvergreenConfig) -> None:
    """Remove downloaded snapshots (they are re-downloaded on demand)."""
    shutil.rmtree(cfg.home_path / "cache" / "memory", ignore_errors=True)
