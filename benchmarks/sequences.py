"""Continual-learning task sequences from real handwritten digits, as frames a user would land.

Run: `python -m benchmarks.sequences` prints every family's tasks (rows, classes, value range).

Source: scikit-learn's bundled `load_digits` (1,797 real 8×8 scans, pixels 0–16, ~180 per class;
no download). Every builder is a pure function of a seed and returns a `TaskSequence`: per task a
TRAIN frame (landed as one batch) and a TEST frame (scored after every step), both with columns
`pixel_0 … pixel_63` (float) and `label` (int).

Scans are never shared between a training row and a test row. Per seed, 25 % of each class's
scans form the TEST POOL; the rest is the TRAINING POOL.
- Domain shift: the training pool is cut into one disjoint, class-stratified chunk per task
  (≈ 337 scans per task for 4 tasks), transformed by that task's shift; each task's test frame is
  the whole test pool under the same shift (the permuted-MNIST convention: one test set per
  domain, never trained on).
- Class arrival (class-incremental): task k trains on every training-pool scan of its classes and
  is tested on the test-pool scans of its classes; the model always predicts over all 10 classes.

Families (task 0 is always the untouched digits, or the first class group):
- `rotate`:   rotation by 0°, 15°, 30°, 45° (bilinear, `scipy.ndimage.rotate`).
- `gain`:     scanner gain/offset (×1, +0), (×1.3, +0.5), (×1.6, +1), (×2, +1.5): values leave
              the first task's range (up to 33.5, and no pixel stays at 0) — a real shift the
              product must accept.
- `classes-a`: digits {0,1,2,3}, then {4,5}, {6,7}, {8,9}.
- `roll`:     images rolled (wrap-around) right and down by 0, 1, 2, 3 pixels (`np.roll`).
- `thicken`:  strokes thickened by grey dilation (none, 1×2, 2×2, 2×2 with gain ×1.5 → up to 24).
- `permute`:  a fixed random pixel permutation per task (task 0 identity) — the hardest.
- `classes-b`: digits {5,6,7,8}, then {9,0}, {1,2}, {3,4}.

VALIDATION vs TEST (decided here, once): defaults may be tuned on VALIDATION only; TEST is run for
the final check and never tuned on. The two splits share no family and no seed.
- VALIDATION: `rotate`, `gain`, `classes-a` × seeds 0, 1, 2.
- TEST: `roll`, `thicken`, `permute`, `classes-b` × seeds 10, 11, 12.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import pandas as pd
from scipy import ndimage
from sklearn.datasets import load_digits

PIXELS = [f"pixel_{i}" for i in range(64)]
LABEL = "label"
CLASSES = list(range(10))
TEST_FRACTION = 0.25
MAX_TASKS = 4

Transform = Callable[[np.ndarray], np.ndarray]  # images [N, 8, 8] → images [N, 8, 8]


@dataclass(frozen=True)
class Task:
    """One step of a sequence: what is landed (train) and what it is scored on (test).

    Attributes:
        name: short description of the task's domain or classes (e.g. "rotate 30°").
        train: the batch to land: PIXELS + LABEL.
        test: never-trained rows of the same domain/classes: PIXELS + LABEL.
        train_scans, test_scans: row indices into `load_digits()` the frames were made from.
    """

    name: str
    train: pd.DataFrame
    test: pd.DataFrame
    train_scans: np.ndarray
    test_scans: np.ndarray


@dataclass(frozen=True)
class TaskSequence:
    """The tasks of one family for one seed, in the order they arrive."""

    family: str
    seed: int
    kind: str  # "domain" | "class"
    tasks: tuple[Task, ...]


@dataclass(frozen=True)
class Split:
    """Which families and seeds a split runs."""

    name: str
    families: tuple[str, ...]
    seeds: tuple[int, ...]


@cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    images = digits.images.astype(np.float64)
    images.setflags(write=False)
    labels = digits.target.astype(np.int64)
    labels.setflags(write=False)
    return images, labels


def _test_pool(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train_pool, test_pool) scan indices: TEST_FRACTION of each class, drawn by `rng`."""
    train, test = [], []
    for c in CLASSES:
        scans = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(TEST_FRACTION * len(scans))
        test.append(scans[:n_test])
        train.append(scans[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _frame(images: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame(images.reshape(len(images), 64).round(4), columns=PIXELS)
    frame[LABEL] = labels.astype(np.int64)
    return frame


def _domain_sequence(
    family: str, seed: int, shifts: list[tuple[str, Transform]], n_tasks: int
) -> TaskSequence:
    """Disjoint, class-stratified training chunks per task; the shared test pool per domain."""
    images, labels = _digits()
    rng = np.random.default_rng(seed)
    train_pool, test_pool = _test_pool(labels, rng)
    chunks: list[list[np.ndarray]] = [[] for _ in range(n_tasks)]
    for c in CLASSES:
        scans = rng.permutation(train_pool[labels[train_pool] == c])
        for t, part in enumerate(np.array_split(scans, n_tasks)):
            chunks[t].append(part)
    tasks = []
    for t, (name, shift) in enumerate(shifts[:n_tasks]):
        train_scans = rng.permutation(np.concatenate(chunks[t]))  # arrival order: shuffled
        tasks.append(
            Task(
                name=name,
                train=_frame(shift(images[train_scans]), labels[train_scans]),
                test=_frame(shift(images[test_pool]), labels[test_pool]),
                train_scans=train_scans,
                test_scans=test_pool.copy(),
            )
        )
    return TaskSequence(family=family, seed=seed, kind="domain", tasks=tuple(tasks))


def _class_sequence(
    family: str, seed: int, groups: list[tuple[int, ...]], n_tasks: int
) -> TaskSequence:
    """Task k: every training-pool scan of group k's classes; test: its test-pool scans."""
    images, labels = _digits()
    rng = np.random.default_rng(seed)
    train_pool, test_pool = _test_pool(labels, rng)
    tasks = []
    for group in groups[:n_tasks]:
        train_scans = rng.permutation(train_pool[np.isin(labels[train_pool], group)])
        test_scans = test_pool[np.isin(labels[test_pool], group)]
        tasks.append(
            Task(
                name="digits " + ",".join(map(str, group)),
                train=_frame(images[train_scans], labels[train_scans]),
                test=_frame(images[test_scans], labels[test_scans]),
                train_scans=train_scans,
                test_scans=test_scans,
            )
        )
    return TaskSequence(family=family, seed=seed, kind="class", tasks=tuple(tasks))


def rotate(angle: float) -> Transform:
    """Rotate every image by `angle` degrees about its centre (bilinear, zero fill)."""

    def shift(images: np.ndarray) -> np.ndarray:
        if angle == 0:
            return images.copy()
        turned = ndimage.rotate(images, angle, axes=(2, 1), reshape=False, order=1, cval=0.0)
        return np.clip(turned, 0.0, 16.0)

    return shift


def gain(factor: float, offset: float) -> Transform:
    """A scanner with another gain and background level: factor · x + offset."""
    return lambda images: factor * images + offset


def roll(pixels: int) -> Transform:
    """Roll every image right and down by `pixels` (wrap-around: no ink is lost)."""
    return lambda images: np.roll(images, (pixels, pixels), axis=(1, 2))


def thicken(size: tuple[int, int], factor: float = 1.0) -> Transform:
    """Thicker strokes: grey dilation with a `size` footprint, then an optional gain."""

    def shift(images: np.ndarray) -> np.ndarray:
        if size == (1, 1):
            return factor * images
        return factor * ndimage.grey_dilation(images, size=(1, *size))

    return shift


def permute(seed: int, task: int) -> Transform:
    """A fixed pixel permutation for (seed, task); task 0 is the identity."""
    if task == 0:
        return lambda images: images.copy()
    order = np.random.default_rng([seed, task, 7919]).permutation(64)
    return lambda images: images.reshape(len(images), 64)[:, order].reshape(images.shape)


def rotate_sequence(seed: int, n_tasks: int = MAX_TASKS) -> TaskSequence:
    shifts = [(f"rotate {a}°", rotate(a)) for a in (0, 15, 30, 45)]
    return _domain_sequence("rotate", seed, shifts, n_tasks)


def gain_sequence(seed: int, n_tasks: int = MAX_TASKS) -> TaskSequence:
    levels = [(1.0, 0.0), (1.3, 0.5), (1.6, 1.0), (2.0, 1.5)]
    shifts = [(f"gain ×{g} +{o}", gain(g, o)) for g, o in levels]
    return _domain_sequence("gain", seed, shifts, n_tasks)


def roll_sequence(seed: int, n_tasks: int = MAX_TASKS) -> TaskSequence:
    shifts = [(f"roll {k}px", roll(k)) for k in range(4)]
    return _domain_sequence("roll", seed, shifts, n_tasks)


def thicken_sequence(seed: int, n_tasks: int = MAX_TASKS) -> TaskSequence:
    shifts = [
        ("strokes as scanned", thicken((1, 1))),
        ("dilate 1×2", thicken((1, 2))),
        ("dilate 2×2", thicken((2, 2))),
        ("dilate 2×2, gain ×1.5", thicken((2, 2), 1.5)),
    ]
    return _domain_sequence("thicken", seed, shifts, n_tasks)


def permute_sequence(seed: int, n_tasks: int = MAX_TASKS) -> TaskSequence:
    shifts = [(f"permutation {t}" if t else "identity", permute(seed, t)) for t in range(4)]
    return _domain_sequence("permute", seed, shifts, n_tasks)


def classes_a_sequence(seed: int, n_tasks: int = MAX_TASKS) -> TaskSequence:
    return _class_sequence("classes-a", seed, [(0, 1, 2, 3), (4, 5), (6, 7), (8, 9)], n_tasks)


def classes_b_sequence(seed: int, n_tasks: int = MAX_TASKS) -> TaskSequence:
    return _class_sequence("classes-b", seed, [(5, 6, 7, 8), (9, 0), (1, 2), (3, 4)], n_tasks)


FAMILIES: dict[str, Callable[..., TaskSequence]] = {
    "rotate": rotate_sequence,
    "gain": gain_sequence,
    "classes-a": classes_a_sequence,
    "roll": roll_sequence,
    "thicken": thicken_sequence,
    "permute": permute_sequence,
    "classes-b": classes_b_sequence,
}

VALIDATION = Split("validation", ("rotate", "gain", "classes-a"), (0, 1, 2))
TEST = Split("test", ("roll", "thicken", "permute", "classes-b"), (10, 11, 12))
SPLITS = {"validation": VALIDATION, "test": TEST}


def build_sequence(family: str, seed: int, n_tasks: int = MAX_TASKS) -> TaskSequence:
    """The sequence of `family` for `seed`, cut to its first `n_tasks` tasks.

    Raises:
        KeyError: unknown family (the message lists the known ones).
        ValueError: n_tasks outside [1, MAX_TASKS].
    """
    if family not in FAMILIES:
        raise KeyError(f"unknown sequence family {family!r}; choose from {sorted(FAMILIES)}")
    if not 1 <= n_tasks <= MAX_TASKS:
        raise ValueError(f"n_tasks must be in [1, {MAX_TASKS}], got {n_tasks}")
    return FAMILIES[family](seed, n_tasks)


def describe(sequence: TaskSequence) -> str:
    """One line per task: name, train/test rows, classes, value range."""
    lines = [f"{sequence.family} (seed {sequence.seed}, {sequence.kind})"]
    for t, task in enumerate(sequence.tasks):
        values = task.train[PIXELS].to_numpy()
        lines.append(
            f"  task {t}: {task.name:<24} train {len(task.train):>4}  test {len(task.test):>4}  "
            f"classes {sorted(task.train[LABEL].unique().tolist())}  "
            f"pixels [{values.min():.1f}, {values.max():.1f}]"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    seed = parser.parse_args().seed
    for name in FAMILIES:
        print(describe(build_sequence(name, seed)))
