"""Reservoir replay buffer: exact Algorithm R, uniform retention, class balance, persistence."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy import stats

from continual.replay import META_FILE, TENSORS_FILE, ReservoirBuffer, mix_batch


def _stream(n: int, n_features: int = 2, n_classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i has features (i, -i) so every retained row is identifiable."""
    ids = torch.arange(n, dtype=torch.float32)
    X = torch.stack([ids * (-1) ** k for k in range(n_features)], dim=1)
    return X, torch.arange(n) % n_classes


def _algorithm_r(n: int, capacity: int, seed: int) -> np.ndarray:
    """Textbook sequential Algorithm R over items 0..n-1 with the buffer's generator."""
    rng = np.random.default_rng(seed)
    slots = np.full(capacity, -1)
    for i in range(n):
        if i < capacity:
            slots[i] = i
            continue
        j = rng.integers(0, i + 1)  # the (i+1)-th item is kept with probability C/(i+1)
        if j < capacity:
            slots[j] = i
    return slots


@pytest.mark.parametrize("chunks", [[700], [30, 70, 1, 599], [100, 600]])
def test_reservoir_equals_sequential_algorithm_r(chunks: list[int]) -> None:
    X, y = _stream(sum(chunks))
    buffer = ReservoirBuffer(100, 2, seed=7)
    start = 0
    for size in chunks:
        buffer.add(X[start : start + size], y[start : start + size], batch_id=f"b{start}")
        start += size
    stored, labels, _ = buffer.tensors()
    expected = _algorithm_r(sum(chunks), 100, seed=7)
    np.testing.assert_array_equal(stored[:, 0].long().numpy(), expected)
    np.testing.assert_array_equal(labels.numpy(), expected % 5)


def _retention_counts(keep: Callable[[int], np.ndarray], n: int, seeds: int) -> np.ndarray:
    """How often each of items 0..n-1 was retained over `seeds` independent runs."""
    counts = np.zeros(n, dtype=np.int64)
    for seed in range(seeds):
        np.add.at(counts, keep(seed), 1)
    return counts


def _uniformity_p(counts: np.ndarray) -> float:
    return float(stats.chisquare(counts).pvalue)


def test_reservoir_retention_is_uniform_and_keep_last_is_not() -> None:
    n, capacity, seeds = 2000, 100, 300
    X, y = _stream(n)

    def reservoir(seed: int) -> np.ndarray:
        buffer = ReservoirBuffer(capacity, 2, seed=seed)
        buffer.add(X, y)
        return buffer.tensors()[0][:, 0].long().numpy()

    def keep_last(seed: int) -> np.ndarray:  # a deliberately biased "sliding window" buffer
        return np.arange(n - capacity, n)

    counts = _retention_counts(reservoir, n, seeds)
    assert counts.sum() == capacity * seeds
    assert _uniformity_p(counts) > 1e-3
    assert _uniformity_p(_retention_counts(keep_last, n, seeds)) < 1e-10


def test_class_balanced_keeps_classes_balanced_after_skewed_stream() -> None:
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.choice(4, size=20_000, p=[0.7, 0.2, 0.08, 0.02]))
    X = torch.randn(len(labels), 3)
    plain = ReservoirBuffer(300, 3, seed=1)
    balanced = ReservoirBuffer(300, 3, policy="class_balanced", seed=1)
    for buffer in (plain, balanced):
        buffer.add(X[:12_000], labels[:12_000], batch_id="2026-11-01")
        buffer.add(X[12_000:], labels[12_000:], batch_id="2026-11-08")
    stats_ = balanced.stats()
    assert stats_.class_counts == {0: 75, 1: 75, 2: 75, 3: 75}
    assert stats_.class_shares() == {0: 0.25, 1: 0.25, 2: 0.25, 3: 0.25}
    assert stats_.class_seen == {c: int((labels == c).sum()) for c in range(4)}
    assert sum(stats_.batch_counts.values()) == 300 and set(stats_.batch_counts) <= {
        "2026-11-01",
        "2026-11-08",
    }
    # The plain reservoir mirrors the skew — that is what stats() is there to reveal.
    assert plain.stats().class_counts[0] > 150 and plain.stats().class_counts[3] < 20


def test_class_balanced_new_class_evicts_from_over_full_and_rare_class_keeps_all() -> None:
    buffer = ReservoirBuffer(90, 1, policy="class_balanced", seed=3)
    buffer.add(torch.zeros(500, 1), torch.zeros(500, dtype=torch.long))
    assert buffer.stats().class_counts == {0: 90}  # free capacity is lent, not left empty
    buffer.add(torch.ones(400, 1), torch.tensor([1, 0] * 200))
    assert buffer.stats().class_counts == {0: 45, 1: 45}
    buffer.add(torch.full((10, 1), 2.0), torch.full((10,), 2))  # rare: below its quota of 30
    counts = buffer.stats().class_counts
    assert counts[2] == 10 and counts[0] + counts[1] == 80 and len(buffer) == 90


def test_class_balanced_is_uniform_within_a_class() -> None:
    n, capacity, seeds = 600, 60, 300
    X = torch.arange(n, dtype=torch.float32)[:, None]
    y = torch.arange(n) % 2  # two classes, 30 slots each

    def kept_of_class_0(seed: int) -> np.ndarray:
        buffer = ReservoirBuffer(capacity, 1, policy="class_balanced", seed=seed)
        buffer.add(X, y)
        rows, labels, _ = buffer.tensors()
        return rows[labels == 0, 0].long().numpy() // 2

    counts = _retention_counts(kept_of_class_0, n // 2, seeds)
    assert counts.sum() == 30 * seeds
    assert _uniformity_p(counts) > 1e-3


def _assert_same_contents(a: ReservoirBuffer, b: ReservoirBuffer) -> None:
    (Xa, ya, ba), (Xb, yb, bb) = a.tensors(), b.tensors()
    assert torch.equal(Xa, Xb) and torch.equal(ya, yb) and ba == bb


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.long])
def test_save_load_round_trip_continues_like_an_unsaved_twin(tmp_path, policy, dtype) -> None:
    rng = np.random.default_rng(1)
    X = torch.from_numpy(rng.integers(0, 1000, size=(900, 4))).to(dtype)
    y = torch.from_numpy(rng.choice(3, size=900, p=[0.6, 0.3, 0.1]))
    twin = ReservoirBuffer(64, 4, policy=policy, seed=5, dtype=dtype)
    saved = ReservoirBuffer(64, 4, policy=policy, seed=5, dtype=dtype)
    for buffer in (twin, saved):
        buffer.add(X[:300], y[:300], batch_id="a")
    saved.save(tmp_path / "replay")
    saved.save(tmp_path / "replay")  # overwriting an existing save is fine
    loaded = ReservoirBuffer.load(tmp_path / "replay")
    _assert_same_contents(loaded, twin)
    assert loaded.stats() == twin.stats() and loaded.tensors()[0].dtype == dtype
    for buffer in (twin, loaded):
        buffer.add(X[300:], y[300:], batch_id="b")
    _assert_same_contents(loaded, twin)
    assert loaded.stats() == twin.stats()
    assert not any(p.name.startswith(".") for p in (tmp_path / "replay").iterdir())


def test_load_reports_missing_and_corrupt_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"buffer\.json"):
        ReservoirBuffer.load(tmp_path / "nowhere")
    buffer = ReservoirBuffer(10, 2)
    buffer.add(*_stream(30))
    buffer.save(tmp_path)
    tensors = (tmp_path / TENSORS_FILE).read_bytes()
    (tmp_path / TENSORS_FILE).write_bytes(tensors[: len(tensors) // 2])
    with pytest.raises(ValueError, match="checksum"):
        ReservoirBuffer.load(tmp_path)
    (tmp_path / TENSORS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(TENSORS_FILE)):
        ReservoirBuffer.load(tmp_path)
    (tmp_path / META_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ReservoirBuffer.load(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({"capacity": 10}))
    with pytest.raises(ValueError, match="lacks the keys"):
        ReservoirBuffer.load(tmp_path)


def test_empty_buffer_round_trips_and_refuses_to_sample(tmp_path) -> None:
    buffer = ReservoirBuffer(5, 3, policy="class_balanced")
    buffer.save(tmp_path)
    loaded = ReservoirBuffer.load(tmp_path)
    assert len(loaded) == 0 and loaded.stats().size == 0
    with pytest.raises(RuntimeError, match="empty"):
        loaded.sample(1)


def test_sample_is_without_replacement_up_to_size() -> None:
    buffer = ReservoirBuffer(50, 2)
    buffer.add(*_stream(50))
    X, y = buffer.sample(50, generator=torch.Generator().manual_seed(0))
    assert sorted(X[:, 0].long().tolist()) == list(range(50))
    assert torch.equal(y, X[:, 0].long() % 5)
    X, _ = buffer.sample(80, generator=torch.Generator().manual_seed(0))
    assert len(X) == 80


def test_add_rejects_bad_shapes_and_dtypes() -> None:
    buffer = ReservoirBuffer(5, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        buffer.add(torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="rows of X"):
        buffer.add(torch.zeros(4, 3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class labels"):
        buffer.add(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4))
    with pytest.raises(ValueError, match="floating dtype"):
        buffer.add(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown replay policy"):
        ReservoirBuffer(5, 3, policy="fifo")  # type: ignore[arg-type]


@pytest.mark.parametrize(("ratio", "expected_old"), [(0.25, 16), (0.4, 26), (0.5, 32), (1.0, 64)])
def test_mix_batch_takes_exactly_round_ratio_from_the_buffer(ratio, expected_old) -> None:
    buffer = ReservoirBuffer(40, 2)
    buffer.add(torch.zeros(40, 2), torch.full((40,), 100))
    X_new, y_new = torch.ones(64, 2), torch.arange(64)
    X, y = mix_batch(X_new, y_new, buffer, ratio, generator=torch.Generator().manual_seed(0))
    assert X.shape == (64, 2) and y.shape == (64,)
    assert int((y == 100).sum()) == expected_old
    new_rows = y[y != 100]
    assert len(set(new_rows.tolist())) == 64 - expected_old  # distinct rows of the new batch


def test_mix_batch_without_buffer_returns_the_new_batch() -> None:
    X_new, y_new = torch.ones(8, 2), torch.arange(8)
    assert mix_batch(X_new, y_new, None, 0.5)[0] is X_new
    assert mix_batch(X_new, y_new, ReservoirBuffer(4, 2), 0.5)[1] is y_new
    with pytest.raises(ValueError, match="replay_ratio"):
        mix_batch(X_new, y_new, None, 1.5)
