"""The benchmark's task sequences: shapes, determinism, disjoint scans, classes, real shifts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from benchmarks.sequences import (
    FAMILIES,
    LABEL,
    PIXELS,
    SENSOR_CLASSES,
    SENSORS,
    SPLITS,
    TEST,
    VALIDATION,
    build_sequence,
    sensor_world,
)

DOMAIN = ["rotate", "gain", "roll", "thicken", "permute", "sensors"]
SENSOR_FAMILIES = {"sensors", "sensor-classes", "sensor-arrival", "sensor-ageing"}
DIGITS = sorted(set(FAMILIES) - SENSOR_FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_frames_are_landable_numeric_and_sized(family):
    sequence = build_sequence(family, seed=0)
    features = list(sequence.features)
    assert features == (SENSORS if family in SENSOR_FAMILIES else PIXELS)
    assert len(sequence.tasks) == 4
    for task in sequence.tasks:
        for frame in (task.train, task.test):
            assert list(frame.columns) == [*features, LABEL]
            assert all(pd.api.types.is_float_dtype(frame[p]) for p in features)
            assert pd.api.types.is_integer_dtype(frame[LABEL])
            assert np.isfinite(frame[features].to_numpy()).all()
            assert set(frame[LABEL]) <= set(sequence.classes)
            if family not in SENSOR_FAMILIES:  # pixels; sensor readings may be negative
                assert frame[features].to_numpy().min() >= 0
        assert len(task.train) == len(task.train_scans) >= 250
        assert len(task.test) == len(task.test_scans) >= 85


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_same_seed_same_frames_other_seed_other_scans(family):
    a, b, c = (build_sequence(family, seed) for seed in (3, 3, 4))
    for ta, tb, tc in zip(a.tasks, b.tasks, c.tasks, strict=True):
        pd.testing.assert_frame_equal(ta.train, tb.train)
        pd.testing.assert_frame_equal(ta.test, tb.test)
        assert not np.array_equal(ta.train_scans, tc.train_scans)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_no_test_scan_is_ever_a_training_scan(family):
    sequence = build_sequence(family, seed=1)
    trained = np.concatenate([t.train_scans for t in sequence.tasks])
    tested = np.concatenate([t.test_scans for t in sequence.tasks])
    assert len(np.intersect1d(trained, tested)) == 0
    # each task's batch comes from scans no other task trains on
    assert len(np.unique(trained)) == len(trained)


@pytest.mark.parametrize("family", DOMAIN)
def test_domain_tasks_cover_every_class_and_share_one_test_pool(family):
    sequence = build_sequence(family, seed=2)
    for task in sequence.tasks:
        assert sorted(task.train[LABEL].unique()) == list(sequence.classes)
        np.testing.assert_array_equal(task.test_scans, sequence.tasks[0].test_scans)
        np.testing.assert_array_equal(task.test[LABEL], sequence.tasks[0].test[LABEL])


@pytest.mark.parametrize(
    ("family", "groups"),
    [
        ("classes-a", [{0, 1, 2, 3}, {4, 5}, {6, 7}, {8, 9}]),
        ("classes-b", [{5, 6, 7, 8}, {9, 0}, {1, 2}, {3, 4}]),
        ("sensor-classes", [{0, 1}, {2}, {3}, {4}]),
        ("sensor-arrival", [{3, 4}, {0}, {1}, {2}]),
    ],
)
def test_class_arrival_groups(family, groups):
    sequence = build_sequence(family, seed=0)
    for task, group in zip(sequence.tasks, groups, strict=True):
        assert set(task.train[LABEL]) == group
        assert set(task.test[LABEL]) == group


@pytest.mark.parametrize("family", sorted(set(DOMAIN) - {"sensors", "sensor-ageing"}))
def test_each_shift_really_changes_the_images(family):
    sequence = build_sequence(family, seed=0)
    first = sequence.tasks[0].test[PIXELS].to_numpy()
    for task in sequence.tasks[1:]:
        # same scans, same labels, different pixels: a mean change of at least 1 grey level
        assert np.abs(task.test[PIXELS].to_numpy() - first).mean() > 1.0


def test_sensors_age_five_more_per_task_and_the_others_stay_calibrated():
    sequence = build_sequence("sensors", seed=10)
    world = sensor_world(10)
    first = sequence.tasks[0].test[SENSORS].to_numpy()
    unit = world.scale  # one generator unit of each sensor, in its own units
    drifted_before = np.zeros(len(SENSORS), dtype=bool)
    for t, task in enumerate(sequence.tasks[1:], start=1):
        change = np.abs(task.test[SENSORS].to_numpy() - first).mean(axis=0) / unit
        drifted = change > 1e-3
        assert drifted.sum() == 5 * t
        assert (drifted >= drifted_before).all()  # a sensor that drifted keeps drifting
        assert change[drifted].min() > 0.2  # at least a fifth of a unit on average
        drifted_before = drifted
    assert sequence.classes == tuple(SENSOR_CLASSES)
    assert sorted(sequence.tasks[0].train[LABEL].unique()) == SENSOR_CLASSES


def test_arriving_sensor_classes_are_read_by_calibrated_sensors():
    calibrated = build_sequence("sensors", seed=12).tasks[0]
    arriving = build_sequence("sensor-classes", seed=12).tasks[1]
    both = calibrated.test.merge(arriving.test, on=[*SENSORS, LABEL])
    assert len(both) == len(arriving.test) > 0  # the same rows, the same readings


def test_sensor_units_differ_by_orders_of_magnitude():
    spread = build_sequence("sensors", seed=11).tasks[0].train[SENSORS].std().to_numpy()
    assert spread.max() / spread.min() > 1e3


def test_first_task_is_the_untouched_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    task = build_sequence("rotate", seed=0).tasks[0]
    np.testing.assert_array_equal(task.train[PIXELS].to_numpy(), digits.data[task.train_scans])
    np.testing.assert_array_equal(task.test[LABEL].to_numpy(), digits.target[task.test_scans])


def test_rotation_turns_a_bar():
    from benchmarks.sequences import rotate

    bar = np.zeros((1, 8, 8))
    bar[0, :, 3:5] = 16.0  # vertical bar
    turned = rotate(45)(bar)[0]  # counter-clockwise as displayed: top goes left
    assert turned[2, 2] == 16 and turned[5, 5] == 16  # on the main diagonal
    assert turned[0, 4] == 0 and turned[7, 3] == 0  # the bar's old ends are empty
    assert turned[1, 6] == 0 and turned[6, 1] == 0  # not the anti-diagonal
    assert turned.min() >= 0 and turned.max() <= 16


def test_gain_leaves_the_first_range_and_thicken_adds_ink():
    gain = build_sequence("gain", seed=0).tasks
    assert gain[-1].train[PIXELS].to_numpy().max() > 30
    thick = build_sequence("thicken", seed=0).tasks
    ink = [(t.test[PIXELS].to_numpy() > 0).mean() for t in thick]
    assert ink[0] < ink[1] < ink[2]


def test_permute_uses_a_different_fixed_permutation_per_task():
    tasks = build_sequence("permute", seed=0).tasks
    first = tasks[0].test[PIXELS].to_numpy()
    # a permutation keeps every row's multiset of values
    for task in tasks[1:]:
        np.testing.assert_array_equal(np.sort(task.test[PIXELS].to_numpy(), 1), np.sort(first, 1))
    assert not np.array_equal(tasks[1].test.to_numpy(), tasks[2].test.to_numpy())


def test_scramble_moves_whole_blocks_in_a_fixed_order_per_task():
    from benchmarks.sequences import scramble

    grid = np.arange(64.0).reshape(1, 8, 8)
    moved = scramble(0, 1)(grid)[0]
    assert sorted(moved.ravel()) == list(range(64))  # every pixel once
    for i in range(0, 8, 2):  # each 2×2 block is some original block, kept whole
        for j in range(0, 8, 2):
            block = moved[i : i + 2, j : j + 2]
            top, left = divmod(int(block[0, 0]), 8)
            np.testing.assert_array_equal(block, grid[0, top : top + 2, left : left + 2])
    assert not np.array_equal(moved, grid[0])
    assert not np.array_equal(scramble(0, 2)(grid), scramble(0, 1)(grid))
    np.testing.assert_array_equal(scramble(0, 0)(grid), grid)


def test_sensor_ageing_drifts_twice_as_far_as_sensors():
    for seed in (0, 1):
        world = sensor_world(seed)
        calm = build_sequence("sensors", seed).tasks[3].test[SENSORS].to_numpy()
        aged = build_sequence("sensor-ageing", seed).tasks[3].test[SENSORS].to_numpy()
        first = build_sequence("sensors", seed).tasks[0].test[SENSORS].to_numpy()
        calm_change = np.abs(calm - first).mean(axis=0) / world.scale
        aged_change = np.abs(aged - first).mean(axis=0) / world.scale
        drifted = calm_change > 1e-3
        assert (aged_change[drifted] > 1.5 * calm_change[drifted]).all()
        assert (aged_change[~drifted] < 1e-9).all()


def test_splits_share_no_family_and_no_seed():
    assert set(SPLITS) == {"validation", "test"}
    assert not set(VALIDATION.families) & set(TEST.families)
    assert not set(VALIDATION.seeds) & set(TEST.seeds)
    assert set(VALIDATION.families) | set(TEST.families) == set(FAMILIES)
    assert set(TEST.families) >= {"sensors", "sensor-classes"}
    assert set(DIGITS) | {"sensor-arrival", "sensor-ageing"} >= set(VALIDATION.families)


def test_bad_arguments_name_the_problem():
    with pytest.raises(KeyError, match="unknown sequence family 'mnist'"):
        build_sequence("mnist", 0)
    with pytest.raises(ValueError, match="n_tasks"):
        build_sequence("rotate", 0, n_tasks=5)
    assert len(build_sequence("classes-a", 0, n_tasks=2).tasks) == 2


def test_a_partial_product_run_gets_its_own_result_entry() -> None:
    """A run of one seed (or family, or a --set variant) must not replace the full run's entry."""
    from benchmarks.bench_product_quality import result_key

    full = {
        "split": "validation",
        "cadence": "daily-lora",
        "declare_bounds": False,
        "families": list(VALIDATION.families),
        "seeds": [0, 1, 2],
    }
    assert result_key(full) == "validation/daily-lora"
    assert result_key({**full, "seeds": [1, 2]}) == "validation/daily-lora/seeds:1,2"
    assert result_key({**full, "families": ["gain"], "overrides": ["daily.lora_r=8"]}) == (
        "validation/daily-lora/gain/set:daily.lora_r=8"
    )


def test_the_product_run_declares_the_sequence_own_columns_and_classes(tmp_path) -> None:
    """The benchmark sets data.features/classes (and declared bounds) from the sequence."""
    from benchmarks.bench_product_quality import overrides_for

    sensors = build_sequence("sensors", seed=10, n_tasks=2)
    sets = overrides_for(tmp_path, "pq", sensors, declare_bounds=True)
    assert f"data.features=[{', '.join(SENSORS)}]" in sets
    assert "data.classes=[0, 1, 2, 3, 4]" in sets
    bounds = next(s for s in sets if s.startswith("data.feature_bounds="))
    assert bounds.count("sensor_") == 20 and ": [-" in bounds  # readings below 0 are declared
    digits = overrides_for(tmp_path, "pq", build_sequence("gain", 0, n_tasks=2), True)
    assert "data.classes=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]" in digits
    assert "pixel_63: [0.0, 22.0]" in next(s for s in digits if "feature_bounds" in s)  # 16×1.3+0.5
