"""Continual-learning task sequences (real handwritten digits, and one tabular sensor family), as
frames a user would land.

Run: `python -m benchmarks.sequences` prints every family's tasks (rows, classes, value range).

Source: scikit-learn's bundled `load_digits` (1,797 real 8×8 scans, pixels 0–16, ~180 per class;
no download), except `sensors` (below). Every builder is a pure function of a seed and returns a
`TaskSequence`: per task a TRAIN frame (landed as one batch) and a TEST frame (scored after every
step), both with the sequence's `features` (float; `pixel_0 … pixel_63` for the digits) and
`label` (int); `classes` lists every class the model may predict.

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
- `sensors`:  not images: 20 tabular sensor readings in mixed units, 5 classes (scikit-learn's
              `make_classification`, world seeded by the sequence's seed: 2,000 rows,
              n_informative 8, n_redundant 4, 8 pure-noise columns, 2 clusters per class,
              class_sep 2.0, flip_y 0.01; then reading = loc + scale · value with scale
              10^U(-2, 3) and loc scale · U(0, 5) per sensor). Domain shift = sensor ageing:
              5 more sensors (a seeded order) start drifting at each task and every drifting
              sensor drifts one more step per task — per step a gain (1 + r)^±1 about its
              operating point (r ~ U(0.1, 0.3), seeded sign) and an offset ±U(0.25, 0.75) of
              the generator's unit (≈ the noise columns' std); by task 3, 15 of 20 sensors have
              drifted 1–3 steps. The scikit-learn bundled tabular sets are too small for this
              protocol: `load_wine` has 178 rows (≈ 33 per task to land, ≈ 8 of them for the
              gate), `load_breast_cancer` 569 rows and 2 classes (≈ 107 per task, ≈ 27 gate
              rows: the gate's minimum detectable effect would exceed 20 pts, and no class
              arrival is possible).
- `sensor-classes`: the same calibrated sensors (no drift), classes arriving: {0,1}, then {2},
              {3}, {4}.
- `sensor-arrival`: its VALIDATION counterpart — other worlds (the validation seeds), another
              arrival order: {3,4}, then {0}, {1}, {2}. Added when `sensor-classes` showed the
              gate stalling on overlapping classes, so that the gate's change could be chosen
              and checked without looking at the test family again.
- `scramble`: VALIDATION counterpart of `permute`: a fixed random order of the sixteen 2×2 pixel
              blocks per task (task 0 identity) — a new input layout that keeps local strokes.
- `sensor-ageing`: VALIDATION counterpart of `sensors`: other worlds, each drift step twice as
              large (gain r ~ U(0.2, 0.6), offset ±U(0.5, 1.5)).
              These two were added when `permute` and `sensors` stayed more than 2 pts below
              joint training, so that a change for domain shift could be chosen on them.

VALIDATION vs TEST (decided here, once): defaults may be tuned on VALIDATION only; TEST is run for
the final check and never tuned on. The two splits share no family and no seed.
- VALIDATION: `rotate`, `gain`, `classes-a`, `sensor-arrival`, `scramble`, `sensor-ageing` ×
  seeds 0, 1, 2.
- TEST: `roll`, `thicken`, `permute`, `classes-b`, `sensors`, `sensor-classes` × seeds 10, 11,
  12. (The two sensor families were added after the defaults were tuned, to check they
  generalise beyond images: never tuned on.)
"""

from __future__ import annotations

import argparse
import dataclasses
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
SENSORS = [f"sensor_{i:02d}" for i in range(20)]
SENSOR_CLASSES = list(range(5))
SENSOR_ROWS = 2000
SENSORS_PER_TASK = 5  # sensors that start drifting at each later task
TEST_FRACTION = 0.25
MAX_TASKS = 4

Transform = Callable[[np.ndarray], np.ndarray]  # images [N, 8, 8] → images (sensors: [N, 20])


@dataclass(frozen=True)
class Task:
    """One step of a sequence: what is landed (train) and what it is scored on (test).

    Attributes:
        name: short description of the task's domain or classes (e.g. "rotate 30°").
        train: the batch to land: the sequence's features + LABEL.
        test: never-trained rows of the same domain/classes: features + LABEL.
        train_scans, test_scans: row indices into the source (`load_digits()`, or the
            sequence's generated rows) the frames were made from.
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
    features: tuple[str, ...]  # the feature columns (data.features)
    classes: tuple[int, ...]  # every class the model may predict (data.classes)


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
    for c in np.unique(labels):
        scans = rng.permutation(np.flatnonzero(labels == c))
        n_test = round(TEST_FRACTION * len(scans))
        test.append(scans[:n_test])
        train.append(scans[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _frame(images: np.ndarray, labels: np.ndarray, columns: list[str] = PIXELS) -> pd.DataFrame:
    frame = pd.DataFrame(images.reshape(len(images), len(columns)).round(4), columns=columns)
    frame[LABEL] = labels.astype(np.int64)
    return frame


def _domain_sequence(
    family: str,
    seed: int,
    shifts: list[tuple[str, Transform]],
    n_tasks: int,
    source: tuple[np.ndarray, np.ndarray] | None = None,
    columns: list[str] = PIXELS,
    classes: list[int] = CLASSES,
) -> TaskSequence:
    """Disjoint, class-stratified training chunks per task; the shared test pool per domain.
    `source`: (values, labels) — the digits' images unless given."""
    images, labels = source if source is not None else _digits()
    rng = np.random.default_rng(seed)
    train_pool, test_pool = _test_pool(labels, rng)
    chunks: list[list[np.ndarray]] = [[] for _ in range(n_tasks)]
    for c in classes:
        scans = rng.permutation(train_pool[labels[train_pool] == c])
        for t, part in enumerate(np.array_split(scans, n_tasks)):
            chunks[t].append(part)
    tasks = []
    for t, (name, shift) in enumerate(shifts[:n_tasks]):
        train_scans = rng.permutation(np.concatenate(chunks[t]))  # arrival order: shuffled
        tasks.append(
            Task(
                name=name,
                train=_frame(shift(images[train_scans]), labels[train_scans], columns),
                test=_frame(shift(images[test_pool]), labels[test_pool], columns),
                train_scans=train_scans,
                test_scans=test_pool.copy(),
            )
        )
    return TaskSequence(
        family=family,
        seed=seed,
        kind="domain",
        tasks=tuple(tasks),
        features=tuple(columns),
        classes=tuple(classes),
    )


def _class_sequence(
    family: str,
    seed: int,
    groups: list[tuple[int, ...]],
    n_tasks: int,
    source: tuple[np.ndarray, np.ndarray] | None = None,
    columns: list[str] = PIXELS,
    classes: list[int] = CLASSES,
) -> TaskSequence:
    """Task k: every training-pool scan of group k's classes; test: its test-pool scans.
    `source`: (values, labels) — the digits' images unless given."""
    images, labels = source if source is not None else _digits()
    what = "digits" if source is None else "classes"
    rng = np.random.default_rng(seed)
    train_pool, test_pool = _test_pool(labels, rng)
    tasks = []
    for group in groups[:n_tasks]:
        train_scans = rng.permutation(train_pool[np.isin(labels[train_pool], group)])
        test_scans = test_pool[np.isin(labels[test_pool], group)]
        tasks.append(
            Task(
                name=f"{what} " + ",".join(map(str, group)),
                train=_frame(images[train_scans], labels[train_scans], columns),
                test=_frame(images[test_scans], labels[test_scans], columns),
                train_scans=train_scans,
                test_scans=test_scans,
            )
        )
    return TaskSequence(
        family=family,
        seed=seed,
        kind="class",
        tasks=tuple(tasks),
        features=tuple(columns),
        classes=tuple(classes),
    )


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


def scramble(seed: int, task: int) -> Transform:
    """A fixed permutation of the sixteen 2×2 pixel blocks for (seed, task); task 0 is the
    identity. A new input layout that keeps each block's local strokes (`permute` keeps none)."""
    if task == 0:
        return lambda images: images.copy()
    blocks = np.random.default_rng([seed, task, 104729]).permutation(16)

    def shuffle(images: np.ndarray) -> np.ndarray:
        tiles = images.reshape(len(images), 4, 2, 4, 2).transpose(0, 1, 3, 2, 4)
        tiles = tiles.reshape(len(images), 16, 2, 2)[:, blocks]
        grid = tiles.reshape(len(images), 4, 4, 2, 2).transpose(0, 1, 3, 2, 4)
        return grid.reshape(images.shape)

    return shuffle


def permute(seed: int, task: int) -> Transform:
    """A fixed pixel permutation for (seed, task); task 0 is the identity."""
    if task == 0:
        return lambda images: images.copy()
    order = np.random.default_rng([seed, task, 7919]).permutation(64)
    return lambda images: images.reshape(len(images), 64)[:, order].reshape(images.shape)


@dataclass(frozen=True)
class SensorWorld:
    """One seed's generated sensor data and how its sensors age (see the module docstring).

    Attributes:
        values: generator units [N, 20] (before the sensors' units: `readings` applies them).
        labels: class per row [N].
        loc, scale: each sensor's unit: reading = loc + scale · value.
        order: sensor indices in the order they start drifting.
        rate, sign, offset: per sensor, the gain step's size r and direction (±1), and the
            offset step (generator units, signed).
    """

    values: np.ndarray
    labels: np.ndarray
    loc: np.ndarray
    scale: np.ndarray
    order: np.ndarray
    rate: np.ndarray
    sign: np.ndarray
    offset: np.ndarray

    def steps(self, task: int) -> np.ndarray:
        """How many drift steps each sensor has taken by `task` (0 for every sensor at task 0)."""
        started = np.empty(len(SENSORS), dtype=np.int64)
        started[self.order] = np.arange(len(SENSORS)) // SENSORS_PER_TASK + 1
        return np.clip(task - started + 1, 0, None)

    def readings(self, values: np.ndarray, task: int) -> np.ndarray:
        """Generator `values` [N, 20] as task `task`'s sensors read them: a gain about the
        operating point (each sensor's mean over the world's rows), an offset, then the units."""
        k = self.steps(task)
        centre = self.values.mean(axis=0)
        gain = (1.0 + self.rate) ** (self.sign * k)
        return self.loc + self.scale * (centre + gain * (values - centre) + k * self.offset)


@cache
def sensor_world(seed: int) -> SensorWorld:
    """The generated sensor data and drift of `seed` (a pure function of it)."""
    from sklearn.datasets import make_classification

    values, labels = make_classification(
        n_samples=SENSOR_ROWS,
        n_features=len(SENSORS),
        n_informative=8,
        n_redundant=4,
        n_repeated=0,
        n_classes=len(SENSOR_CLASSES),
        n_clusters_per_class=2,
        class_sep=2.0,
        flip_y=0.01,
        random_state=seed,
    )
    rng = np.random.default_rng([seed, 2027])
    scale = 10.0 ** rng.uniform(-2, 3, len(SENSORS))
    arrays = {
        "loc": scale * rng.uniform(0, 5, len(SENSORS)),
        "scale": scale,
        "order": rng.permutation(len(SENSORS)),
        "rate": rng.uniform(0.1, 0.3, len(SENSORS)),
        "sign": rng.choice([-1.0, 1.0], len(SENSORS)),
        "offset": rng.choice([-1.0, 1.0], len(SENSORS)) * rng.uniform(0.25, 0.75, len(SENSORS)),
    }
    world = SensorWorld(values=values, labels=labels.astype(np.int64), **arrays)
    for array in (world.values, world.labels, *arrays.values()):
        array.setflags(write=False)
    return world


def sensors_sequence(seed: int, n_tasks: int = MAX_TASKS) -> TaskSequence:
    return _ageing_sequence("sensors", seed, n_tasks)


def sensor_ageing_sequence(seed: int, n_tasks: int = MAX_TASKS) -> TaskSequence:
    """`sensors`' VALIDATION counterpart: other worlds, and every drift step twice as large."""
    return _ageing_sequence("sensor-ageing", seed, n_tasks, severity=2.0)


def _ageing_sequence(family: str, seed: int, n_tasks: int, severity: float = 1.0) -> TaskSequence:
    world = sensor_world(seed)
    if severity != 1.0:
        world = dataclasses.replace(
            world, rate=world.rate * severity, offset=world.offset * severity
        )

    def ageing(task: int) -> Transform:
        return lambda values: world.readings(values, task)

    def name(task: int) -> str:
        return f"{int((world.steps(task) > 0).sum())} sensors drifted" if task else "calibrated"

    shifts = [(name(t), ageing(t)) for t in range(MAX_TASKS)]
    return _domain_sequence(
        family, seed, shifts, n_tasks, (world.values, world.labels), SENSORS, SENSOR_CLASSES
    )


def _sensor_arrival(family: str, groups: list[tuple[int, ...]]) -> Callable[..., TaskSequence]:
    def build(seed: int, n_tasks: int = MAX_TASKS) -> TaskSequence:
        world = sensor_world(seed)
        source = (world.readings(world.values, 0), world.labels)
        return _class_sequence(family, seed, groups, n_tasks, source, SENSORS, SENSOR_CLASSES)

    return build


sensor_classes_sequence = _sensor_arrival("sensor-classes", [(0, 1), (2,), (3,), (4,)])
sensor_arrival_sequence = _sensor_arrival("sensor-arrival", [(3, 4), (0,), (1,), (2,)])


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


def scramble_sequence(seed: int, n_tasks: int = MAX_TASKS) -> TaskSequence:
    shifts = [(f"block order {t}" if t else "identity", scramble(seed, t)) for t in range(4)]
    return _domain_sequence("scramble", seed, shifts, n_tasks)


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
    "sensors": sensors_sequence,
    "sensor-classes": sensor_classes_sequence,
    "sensor-arrival": sensor_arrival_sequence,
    "scramble": scramble_sequence,
    "sensor-ageing": sensor_ageing_sequence,
}

VALIDATION = Split(
    "validation",
    ("rotate", "gain", "classes-a", "sensor-arrival", "scramble", "sensor-ageing"),
    (0, 1, 2),
)
TEST = Split(
    "test", ("roll", "thicken", "permute", "classes-b", "sensors", "sensor-classes"), (10, 11, 12)
)
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
        values = task.train[list(sequence.features)].to_numpy()
        lines.append(
            f"  task {t}: {task.name:<24} train {len(task.train):>4}  test {len(task.test):>4}  "
            f"classes {sorted(task.train[LABEL].unique().tolist())}  "
            f"values [{values.min():.1f}, {values.max():.1f}]"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    seed = parser.parse_args().seed
    for name in FAMILIES:
        print(describe(build_sequence(name, seed)))
