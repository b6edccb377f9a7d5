"""Experience replay: a bounded buffer of past examples, mixed into new batches in one pass.

Why a reservoir: the stream has no end and no clear task boundaries, yet every example seen so
far should have the same chance to be replayed. Algorithm R (keep the first C; afterwards the
n-th example replaces a uniformly chosen slot with probability C/n) gives exactly that with O(C)
memory. Its trap is that the buffer's class/batch composition follows the stream's, so a rare
class fades from memory; `stats()` exposes the composition so flows can log it, and the
`class_balanced` policy keeps an equal share per class instead.

Randomness comes from one numpy `Generator` per buffer whose state is saved with the buffer, so
`add()` after `load()` continues exactly as an unsaved twin would. The reservoir policy draws
all replacement positions of an `add()` call in one vectorised call, which consumes the stream
exactly as sequential draws would (one call of N rows == N calls of one row).
"""

from __future__ import annotations

import hashlib
import json
from bisect import insort
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from continual.files import atomic_write_bytes

Policy = Literal["reservoir", "class_balanced"]
POLICIES: tuple[str, ...] = ("reservoir", "class_balanced")
TENSORS_FILE = "buffer.safetensors"
META_FILE = "buffer.json"
FORMAT_VERSION = 1
_META_KEYS: tuple[str, ...] = ("capacity", "n_features", "policy", "dtype", "size", "n_seen")
_META_KEYS += ("class_seen", "batch_ids", "rng_state", "tensors_sha256")


@dataclass
class BufferStats:
    """What the buffer holds: per class and per batch id, next to how much it has seen.

    `class_counts` lists every class seen so far (0 when none of its examples is stored);
    `class_seen` counts every example of each class that ever passed through `add()`.
    """

    capacity: int
    size: int
    n_seen: int
    class_counts: dict[int, int]
    batch_counts: dict[str, int]
    class_seen: dict[int, int] = field(default_factory=dict)

    def class_shares(self) -> dict[int, float]:
        """Share of the stored examples per class (0.0 for every class when empty)."""
        total = max(self.size, 1)
        return {c: k / total for c, k in sorted(self.class_counts.items())}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (class labels become string keys)."""
        return {
            "capacity": self.capacity,
            "size": self.size,
            "n_seen": self.n_seen,
            "class_counts": {str(c): k for c, k in sorted(self.class_counts.items())},
            "class_shares": {str(c): s for c, s in self.class_shares().items()},
            "class_seen": {str(c): k for c, k in sorted(self.class_seen.items())},
            "batch_counts": dict(sorted(self.batch_counts.items())),
        }


class ReservoirBuffer:
    """A fixed-capacity replay memory of (features, label, batch id) rows.

    Args:
        capacity: most examples kept.
        n_features: width of every row of X.
        policy: "reservoir" (uniform over the whole stream, Algorithm R) or "class_balanced"
            (an equal share of the capacity per class seen so far; see `_plan_class_balanced`).
        seed: seeds the buffer's own random generator.
        dtype: storage dtype of X; use torch.long for token ids.

    Raises:
        ValueError: non-positive capacity/n_features or an unknown policy.
    """

    def __init__(
        self,
        capacity: int,
        n_features: int,
        *,
        policy: Policy = "reservoir",
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if capacity <= 0 or n_features <= 0:
            raise ValueError(
                f"capacity and n_features must be positive, got {capacity} and {n_features}"
            )
        if policy not in POLICIES:
            raise ValueError(f"unknown replay policy {policy!r}: expected one of {POLICIES}")
        self.capacity = int(capacity)
        self.n_features = int(n_features)
        self.policy: Policy = policy
        self.seed = seed
        self.dtype = dtype
        self._X = torch.zeros(self.capacity, self.n_features, dtype=dtype)
        self._y = np.zeros(self.capacity, dtype=np.int64)
        self._batch = np.zeros(self.capacity, dtype=np.int64)
        self._batch_ids: list[str] = []
        self._batch_lookup: dict[str, int] = {}
        self._size = 0
        self._n_seen = 0
        self._class_seen: dict[int, int] = {}
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self._size

    @property
    def n_seen(self) -> int:
        """Examples that ever passed through `add()`."""
        return self._n_seen

    def add(self, X: Tensor, y: Tensor, batch_id: str = "") -> None:
        """Offer a batch of examples to the buffer (each kept or not according to the policy).

        Args:
            X: [N, n_features] features (float, or integer token ids).
            y: [N] integer labels.
            batch_id: landing-zone batch the rows come from (kept per row, reported by stats()).

        Raises:
            ValueError: shapes or dtypes that do not fit the buffer.
        """
        X, labels = self._check_batch(X, y)
        if len(labels) == 0:
            return
        if self.policy == "reservoir":
            dest, src = self._plan_reservoir(len(labels))
        else:
            dest, src = self._plan_class_balanced(labels)
        for c, k in zip(*np.unique(labels, return_counts=True), strict=True):
            self._class_seen[int(c)] = self._class_seen.get(int(c), 0) + int(k)
        self._n_seen += len(labels)
        self._write(dest, src, X, labels, self._batch_index(batch_id))

    def _check_batch(self, X: Tensor, y: Tensor) -> tuple[Tensor, np.ndarray]:
        X = torch.as_tensor(X).detach().cpu()
        y = torch.as_tensor(y).detach().cpu()
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"X must be [N, {self.n_features}], got {list(X.shape)}")
        if y.ndim != 1 or len(y) != len(X):
            raise ValueError(f"y must be [N] with N={len(X)} (rows of X), got {list(y.shape)}")
        if y.is_floating_point() or y.is_complex():
            raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
        if X.is_floating_point() and not self.dtype.is_floating_point:
            raise ValueError(
                f"X is {X.dtype} but the buffer stores {self.dtype}: create the buffer with a "
                "floating dtype, or pass integer token ids"
            )
        return X, y.numpy().astype(np.int64, copy=False)

    def _batch_index(self, batch_id: str) -> int:
        if batch_id not in self._batch_lookup:
            self._batch_lookup[batch_id] = len(self._batch_ids)
            self._batch_ids.append(batch_id)
        return self._batch_lookup[batch_id]

    def _plan_reservoir(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Algorithm R for rows 0..n-1 of a call: (destination slot, source row) pairs, in order."""
        fill = min(self.capacity - self._size, n)
        dest = [np.arange(self._size, self._size + fill)]
        src = [np.arange(fill)]
        rest = np.arange(fill, n)
        if len(rest):
            position = self._n_seen + rest + 1  # 1-based position of each row in the stream
            slot = self._rng.integers(0, position)
            kept = slot < self.capacity
            dest.append(slot[kept])
            src.append(rest[kept])
        self._size += fill
        return np.concatenate(dest), np.concatenate(src)

    def _quotas(self, classes: list[int]) -> dict[int, int]:
        """Equal shares of the capacity; the remainder goes to the smallest labels."""
        base, extra = divmod(self.capacity, len(classes))
        return {c: base + (i < extra) for i, c in enumerate(sorted(classes))}

    def _plan_class_balanced(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One reservoir per class, an equal quota per class seen so far.

        While the buffer has free slots every example is stored. Once it is full, an example of a
        class below its quota (a new class always is) evicts a uniformly chosen example of the most
        over-full class; an example of a class at or above its quota runs Algorithm R within its
        own class (kept with probability stored_c / seen_c, replacing a uniform slot of that class).
        Within each class the stored examples stay a uniform sample of that class's stream, and
        every class that has seen at least its quota ends with exactly its quota. Free capacity
        is lent to any class rather than left empty. One Python step per example (plain ints).
        """
        size = self._size
        slots = {c: np.flatnonzero(self._y[:size] == c).tolist() for c in self._class_seen}
        seen = dict(self._class_seen)
        position = np.empty(len(labels), dtype=np.int64)  # 1-based position within its class
        for c in np.unique(labels):
            rows = np.flatnonzero(labels == c)
            position[rows] = seen.get(int(c), 0) + np.arange(1, len(rows) + 1)
        draws = self._rng.integers(0, position).tolist()
        quotas = self._quotas(list(slots)) if slots else {}
        dest: list[int] = []
        src: list[int] = []
        for row, (c, draw) in enumerate(zip(labels.tolist(), draws, strict=True)):
            if c not in slots:
                slots[c] = []
                quotas = self._quotas(list(slots))
            own = slots[c]
            if size < self.capacity:
                slot, size = size, size + 1
                own.append(slot)
            elif len(own) < quotas[c]:
                victim = _most_over_quota(slots, quotas)
                slot = slots[victim].pop(int(self._rng.integers(len(slots[victim]))))
                insort(own, slot)
            elif draw < len(own):
                slot = own[draw]
            else:
                continue
            dest.append(slot)
            src.append(row)
        self._size = size
        return np.asarray(dest, dtype=np.int64), np.asarray(src, dtype=np.int64)

    def _write(
        self, dest: np.ndarray, src: np.ndarray, X: Tensor, labels: np.ndarray, batch: int
    ) -> None:
        if len(dest) == 0:
            return
        # A slot replaced twice within one call keeps its last writer, as a sequential loop would.
        _, last_in_reversed = np.unique(dest[::-1], return_index=True)
        keep = len(dest) - 1 - last_in_reversed
        dest, src = dest[keep], src[keep]
        self._X[torch.from_numpy(dest)] = X[torch.from_numpy(src)].to(self.dtype)
        self._y[dest] = labels[src]
        self._batch[dest] = batch

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw n stored examples uniformly (without replacement when n <= len(self)).

        Args:
            n: examples to draw.
            generator: torch generator for the draw (default: torch's global generator).

        Returns:
            (X [n, n_features] in the storage dtype, y [n] long), copies.

        Raises:
            RuntimeError: the buffer is empty.
            ValueError: negative n.
        """
        if n < 0:
            raise ValueError(f"cannot sample a negative number of examples ({n})")
        if self._size == 0:
            raise RuntimeError("the replay buffer is empty: add() examples before sampling")
        if n <= self._size:
            index = torch.randperm(self._size, generator=generator)[:n]
        else:
            index = torch.randint(self._size, (n,), generator=generator)
        return self._X[index], torch.from_numpy(self._y[index.numpy()])

    def tensors(self) -> tuple[Tensor, Tensor, list[str]]:
        """Copies of the stored rows: (X [size, F], y [size] long, batch id per row)."""
        size = self._size
        batch_ids = [self._batch_ids[i] for i in self._batch[:size].tolist()]
        return self._X[:size].clone(), torch.from_numpy(self._y[:size].copy()), batch_ids

    def stats(self) -> BufferStats:
        """Composition of the buffer (per class and per batch id) — it drifts with the stream."""
        size = self._size
        class_counts = dict.fromkeys(sorted(self._class_seen), 0)
        for c, k in zip(*np.unique(self._y[:size], return_counts=True), strict=True):
            class_counts[int(c)] = int(k)
        batch_counts = {
            self._batch_ids[int(b)]: int(k)
            for b, k in zip(*np.unique(self._batch[:size], return_counts=True), strict=True)
        }
        return BufferStats(
            capacity=self.capacity,
            size=size,
            n_seen=self._n_seen,
            class_counts=class_counts,
            batch_counts=batch_counts,
            class_seen=dict(sorted(self._class_seen.items())),
        )

    def save(self, directory: str | Path) -> None:
        """Write buffer.safetensors and buffer.json into `directory` (created if missing).

        Each file is written to a temporary name and renamed into place; buffer.json is renamed
        last and records the SHA-256 of buffer.safetensors, so a crash between the two renames is
        detected by `load()` instead of pairing new tensors with old metadata.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        size = self._size
        present, batch_index = np.unique(self._batch[:size], return_inverse=True)
        payload = save_safetensors(
            {
                "X": self._X[:size].contiguous(),
                "y": torch.from_numpy(self._y[:size].copy()),
                "batch_index": torch.from_numpy(batch_index.astype(np.int64)),
            }
        )
        meta = {
            "format_version": FORMAT_VERSION,
            "capacity": self.capacity,
            "n_features": self.n_features,
            "policy": self.policy,
            "dtype": str(self.dtype).removeprefix("torch."),
            "seed": self.seed,
            "size": size,
            "n_seen": self._n_seen,
            "class_seen": {str(c): k for c, k in sorted(self._class_seen.items())},
            "batch_ids": [self._batch_ids[int(b)] for b in present],
            "rng_state": self._rng.bit_generator.state,
            "tensors_sha256": hashlib.sha256(payload).hexdigest(),
        }
        atomic_write_bytes(directory / TENSORS_FILE, payload)
        atomic_write_bytes(directory / META_FILE, json.dumps(meta, indent=2).encode())

    @classmethod
    def load(cls, directory: str | Path) -> ReservoirBuffer:
        """Restore a buffer written by `save()`, random generator state included.

        Raises:
            FileNotFoundError: the directory or one of its two files is missing.
            ValueError: a file is corrupt, truncated, or the two files do not belong together.
        """
        directory = Path(directory)
        meta = _read_meta(directory / META_FILE)
        tensors = _read_tensors(directory / TENSORS_FILE, meta["tensors_sha256"])
        dtype = getattr(torch, meta["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{directory / META_FILE}: unknown dtype {meta['dtype']!r}")
        buffer = cls(
            meta["capacity"],
            meta["n_features"],
            policy=meta["policy"],
            seed=meta.get("seed", 0),
            dtype=dtype,
        )
        buffer._restore(meta, tensors, directory)
        return buffer

    def _restore(self, meta: dict[str, Any], tensors: dict[str, Tensor], directory: Path) -> None:
        size = int(meta["size"])
        X, y, index = tensors["X"], tensors["y"], tensors["batch_index"]
        expected = {"X": [size, self.n_features], "y": [size], "batch_index": [size]}
        actual = {"X": list(X.shape), "y": list(y.shape), "batch_index": list(index.shape)}
        if expected != actual or size > self.capacity:
            raise ValueError(
                f"{directory / TENSORS_FILE}: tensor shapes {actual} do not match "
                f"{directory / META_FILE} (expected {expected}, capacity {self.capacity})"
            )
        if size and int(index.max()) >= len(meta["batch_ids"]):
            raise ValueError(f"{directory / TENSORS_FILE}: batch_index points past batch_ids")
        self._X[:size] = X.to(self.dtype)
        self._y[:size] = y.numpy()
        self._batch[:size] = index.numpy()
        self._batch_ids = list(meta["batch_ids"])
        self._batch_lookup = {b: i for i, b in enumerate(self._batch_ids)}
        self._size = size
        self._n_seen = int(meta["n_seen"])
        self._class_seen = {int(c): int(k) for c, k in meta["class_seen"].items()}
        self._rng.bit_generator.state = meta["rng_state"]


def _most_over_quota(slots: dict[int, list[int]], quotas: dict[int, int]) -> int:
    """The class furthest above its quota (smallest label on ties)."""
    return max(sorted(slots), key=lambda c: len(slots[c]) - quotas[c])


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"replay buffer metadata {path} not found (was save() called?)")
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): the buffer is corrupt") from error
    missing = [key for key in _META_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise ValueError(f"{path} lacks the keys {missing}: not a replay buffer written by save()")
    if meta.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta['format_version']} is newer than this code")
    return meta


def _read_tensors(path: Path, sha256: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"replay buffer tensors {path} not found next to {META_FILE}")
    payload = path.read_bytes()
    if hashlib.sha256(payload).hexdigest() != sha256:
        raise ValueError(
            f"{path} does not match the checksum recorded in {META_FILE}: "
            "the file is corrupt or was written by a different save()"
        )
    tensors = load_safetensors(payload)
    missing = {"X", "y", "batch_index"} - set(tensors)
    if missing:
        raise ValueError(f"{path} lacks the tensors {sorted(missing)}")
    return tensors


def mix_batch(
    X_new: Tensor,
    y_new: Tensor,
    buffer: ReservoirBuffer | None,
    replay_ratio: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One training batch of len(X_new) rows: round(ratio·B) replayed, the rest new.

    Mixing in one batch means one forward pass and one gradient that balances old and new.
    The new rows kept are a random subset (so no row of the new batch is systematically
    dropped); replayed rows come last, cast to X_new's dtype and device.

    Args:
        X_new, y_new: the new mini-batch ([B, F], [B]).
        buffer: the replay memory; None or empty returns the new batch unchanged.
        replay_ratio: share of the batch drawn from the buffer, in [0, 1].
        generator: torch generator for both draws.

    Returns:
        (X [B, F], y [B]).

    Raises:
        ValueError: ratio outside [0, 1] or X_new/y_new of different lengths.
    """
    if not 0.0 <= replay_ratio <= 1.0:
        raise ValueError(f"replay_ratio must be in [0, 1], got {replay_ratio}")
    if len(X_new) != len(y_new):
        raise ValueError(f"X_new has {len(X_new)} rows but y_new has {len(y_new)}")
    n_batch = len(X_new)
    n_old = round(replay_ratio * n_batch) if buffer is not None and len(buffer) else 0
    if buffer is None or n_old == 0:
        return X_new, y_new
    keep = torch.randperm(n_batch, generator=generator)[: n_batch - n_old].to(X_new.device)
    X_old, y_old = buffer.sample(n_old, generator=generator)
    X = torch.cat([X_new[keep], X_old.to(device=X_new.device, dtype=X_new.dtype)])
    y = torch.cat([y_new[keep], y_old.to(device=y_new.device, dtype=y_new.dtype)])
    return X, y
