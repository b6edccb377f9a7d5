"""The data memory every flow reads and extends: replay buffer, held-out rows, data profile.

See `model_registry.memory` for why the memory is not part of a model version. Here it is a
plain value: `DataMemory.remember` returns a new memory that also holds one accepted batch
(adding a batch it already holds returns it unchanged), and `commit_memory` appends it to the
chain in MLflow, re-applying the batches to a newer head if another flow committed first.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from continual.replay import ReservoirBuffer
from data_plane.profile import DataProfile
from data_plane.splits import ThreeWaySplit, update_retention
from evergreen.config import EvergreenConfig
from model_registry.memory import MemoryRef, MemoryStore, StaleMemoryError
from tasks.common import encode_labels, text_ids

BATCH_COLUMN = "batch_id"
ROLES = ("select", "gate")
_COMMIT_ATTEMPTS = 5
CACHE_MIN_AGE_SECONDS = 60.0


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
    """

    batches: tuple[str, ...] = ()
    buffer: ReservoirBuffer | None = None
    held_out: dict[str, pd.DataFrame] = field(default_factory=dict)
    profile: DataProfile = field(default_factory=DataProfile)
    ref: MemoryRef | None = None

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
        profile = self.profile.updated(frame, cfg.data.features, cfg.data.label)
        return DataMemory((*self.batches, batch_id), buffer, held_out, profile, None)

    def save(self, directory: Path) -> Path:
        """Write the snapshot layout (docs/CONTRACTS.md) into `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "batches.txt").write_text("\n".join(self.batches) + "\n")
        (directory / "profile.json").write_text(self.profile.to_json())
        if self.buffer is not None:
            self.buffer.save(directory / "replay")
        for role, frame in self.held_out.items():
            frame.to_parquet(directory / f"held_out-{role}.parquet", index=False)
        return directory

    @classmethod
    def load(cls, directory: Path, ref: MemoryRef | None = None) -> DataMemory:
        """Read a snapshot written by `save`."""
        batches = tuple(b for b in (directory / "batches.txt").read_text().splitlines() if b)
        replay = directory / "replay"
        held_out = {
            role: pd.read_parquet(path)
            for role in ROLES
            if (path := directory / f"held_out-{role}.parquet").exists()
        }
        return cls(
            batches=batches,
            buffer=ReservoirBuffer.load(replay) if replay.exists() else None,
            held_out=held_out,
            profile=DataProfile.from_json((directory / "profile.json").read_text()),
            ref=ref,
        )


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
    """The snapshot `ref` (cached under `<home>/cache/memory/<run>`), or an empty memory."""
    if ref is None:
        return DataMemory()
    cache = cfg.home_path / "cache" / "memory"
    target = cache / ref.run_id
    if not target.exists():
        memory_store(cfg).download(ref, target)
    try:
        memory = DataMemory.load(target, ref)
    except FileNotFoundError:  # pruned by another process between exists() and load
        shutil.rmtree(target, ignore_errors=True)
        memory_store(cfg).download(ref, target)
        memory = DataMemory.load(target, ref)
    prune_cache(cache, keep=ref.run_id)
    return memory


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
            updated.save(Path(tmp) / "snapshot")
            try:
                ref = store.commit(
                    Path(tmp) / "snapshot", parent=parent, batch_ids=list(updated.batches)
                )
            except StaleMemoryError as stale:
                get_run_logger().info("%s; re-applying to the new head", stale)
                memory = read_memory(cfg, store.head())
                continue
        get_run_logger().info(
            "memory: %d batches (+%s), %d replay rows",
            len(updated.batches),
            [b for b in updated.batches if b not in memory.batches],
            len(updated.buffer) if updated.buffer is not None else 0,
        )
        return replace(updated, ref=ref)
    raise StaleMemoryError(f"memory kept moving during {_COMMIT_ATTEMPTS} attempts; rerun the flow")


def clear_cache(cfg: EvergreenConfig) -> None:
    """Remove downloaded snapshots (they are re-downloaded on demand)."""
    shutil.rmtree(cfg.home_path / "cache" / "memory", ignore_errors=True)
