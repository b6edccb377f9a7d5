"""EMA teacher and Page-Hinkley drift detection (checked against River's reference detector)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from river.drift import PageHinkley as RiverPageHinkley
from torch import nn

from continual.streaming import (
    EMATeacher,
    PageHinkley,
    calibrate_threshold,
    detect,
    ph_statistic,
)


def _losses(rng: np.random.Generator, n: int, scale: float = 0.3) -> np.ndarray:
    """Cross-entropy-like losses: positive, skewed."""
    return rng.gamma(2.0, scale, size=n)


def _river_indices(stream: np.ndarray, **params) -> list[int]:
    detector = RiverPageHinkley(**params)
    hits = []
    for i, x in enumerate(stream):
        detector.update(float(x))
        if detector.drift_detected:
            hits.append(i)
    return hits


STREAMS = {
    "stationary": lambda rng: rng.normal(0.0, 1.0, 3000),
    "shift_up": lambda rng: np.concatenate([rng.normal(0, 1, 1500), rng.normal(1.0, 1, 1500)]),
    "up_then_down": lambda rng: np.concatenate(
        [rng.normal(0, 1, 1000), rng.normal(1.5, 1, 1000), rng.normal(-0.5, 1, 1000)]
    ),
    "losses": lambda rng: np.concatenate([_losses(rng, 1500), _losses(rng, 1500, 0.5)]),
}
PARAMS = [
    {"delta": 0.005, "threshold": 50.0, "min_samples": 30},
    {"delta": 0.05, "threshold": 5.0, "min_samples": 10},
    {"delta": 0.0, "threshold": 2.0, "min_samples": 1},
    {"delta": 0.01, "threshold": 10.0, "min_samples": 50, "alpha": 0.99},
]


@pytest.mark.parametrize("stream_name", sorted(STREAMS))
@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("mode", ["up", "down", "both"])
def test_page_hinkley_fires_where_river_does(stream_name, params, mode) -> None:
    stream = STREAMS[stream_name](np.random.default_rng(len(stream_name)))
    ours = detect(stream, PageHinkley(mode=mode, **params))
    river_params = {**params, "min_instances": params["min_samples"]}
    del river_params["min_samples"]
    assert ours == _river_indices(stream, mode=mode, **river_params)


def test_page_hinkley_detections_are_not_trivial() -> None:
    """The River comparison must cover streams with several detections, not only silence."""
    rng = np.random.default_rng(len("shift_up"))
    hits = detect(STREAMS["shift_up"](rng), PageHinkley(delta=0.05, threshold=5.0, min_samples=10))
    assert len(hits) >= 3


def test_detects_a_mean_shift_within_bounded_delay_and_is_quiet_before() -> None:
    rng = np.random.default_rng(0)
    threshold = calibrate_threshold(_losses(rng, 2000), stream_length=2000)
    stream = np.concatenate([_losses(rng, 1000), _losses(rng, 500) + 0.5])
    hits = detect(stream, PageHinkley(threshold=threshold))
    assert hits, "a +0.5 shift in mean loss (about one standard deviation) went undetected"
    assert 1000 <= hits[0] < 1000 + 150


def test_calibrated_threshold_stays_quiet_on_stationary_streams() -> None:
    rng = np.random.default_rng(1)
    threshold = calibrate_threshold(_losses(rng, 1000), false_alarm_rate=0.01)
    alarms = sum(
        bool(detect(_losses(rng, 1000), PageHinkley(threshold=threshold))) for _ in range(60)
    )
    assert alarms <= 3  # target 1% of streams: 0.6 expected
    naive = sum(bool(detect(_losses(rng, 1000), PageHinkley(threshold=1.0))) for _ in range(20))
    assert naive >= 15  # an uncalibrated small h fires on almost every stationary stream


def test_calibrated_threshold_scales_with_the_loss_scale() -> None:
    stable = _losses(np.random.default_rng(2), 1500)
    assert calibrate_threshold(10 * stable, delta=0.0) == pytest.approx(
        10 * calibrate_threshold(stable, delta=0.0), rel=1e-9
    )
    ratio = calibrate_threshold(10 * stable) / calibrate_threshold(stable)
    assert 9.0 < ratio < 12.5  # delta does not scale, so only approximately 10x


def test_vectorised_statistic_equals_the_sequential_detector() -> None:
    rng = np.random.default_rng(3)
    streams = rng.normal(size=(3, 800)).cumsum(axis=1) * 0.01 + rng.normal(size=(3, 800))
    for mode in ("up", "down", "both"):
        vectorised = ph_statistic(streams, delta=0.01, alpha=0.999, mode=mode)
        for row, stream in enumerate(streams):
            detector = PageHinkley(delta=0.01, threshold=np.inf, alpha=0.999, mode=mode)
            sequential = []
            for x in stream:
                detector.update(x)
                sequential.append(detector.statistic)
            np.testing.assert_allclose(vectorised[row], sequential, atol=1e-9)


def test_state_dict_resumes_a_monitor_exactly() -> None:
    rng = np.random.default_rng(4)
    stream = np.concatenate([rng.normal(0, 1, 700), rng.normal(1, 1, 700)])
    params = {"delta": 0.05, "threshold": 5.0, "min_samples": 10}
    uninterrupted = detect(stream, PageHinkley(**params))
    first = PageHinkley(**params)
    hits = detect(stream[:900], first)
    resumed = PageHinkley()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    hits += [900 + i for i in detect(stream[900:], resumed)]
    assert hits == uninterrupted and resumed.n_total == len(stream)


def test_page_hinkley_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        PageHinkley().update(float("nan"))
    with pytest.raises(ValueError, match="mode"):
        PageHinkley(mode="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_samples"):
        calibrate_threshold([0.1, 0.2], min_samples=30)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.train()(torch.randn(16, 4))  # moves BatchNorm running statistics


def test_ema_update_equals_the_formula_and_copies_buffers() -> None:
    student = _net()
    teacher = EMATeacher(student, decay=0.9)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    _perturb(student)
    teacher.update(student)
    for name, value in student.named_parameters():
        expected = 0.9 * before[name] + 0.1 * value.detach()
        torch.testing.assert_close(teacher.state_dict()[name], expected, rtol=1e-6, atol=1e-7)
        assert not torch.equal(teacher.state_dict()[name], value)
    for name, value in student.named_buffers():
        assert torch.equal(teacher.state_dict()[name], value)


def test_ema_decay_zero_copies_and_one_freezes() -> None:
    student = _net()
    copier, frozen = EMATeacher(student, decay=0.0), EMATeacher(student, decay=1.0)
    start = {k: v.clone() for k, v in frozen.module.named_parameters()}
    _perturb(student)
    copier.update(student)
    frozen.update(student)
    for name, value in student.state_dict().items():
        assert torch.equal(copier.state_dict()[name], value)
    for name, value in frozen.module.named_parameters():
        assert torch.equal(value, start[name])


def test_teacher_is_a_frozen_independent_copy() -> None:
    student = _net().train()
    teacher = EMATeacher(student)
    assert not teacher.module.training
    assert all(not p.requires_grad for p in teacher.module.parameters())
    assert all(p.requires_grad for p in student.parameters())
    _perturb(student)  # does not reach the teacher without update()
    assert not torch.equal(teacher.module[0].weight, student[0].weight)
    teacher(torch.randn(3, 4)).sum()  # callable, no grad needed
    with pytest.raises(ValueError, match="names differ"):
        teacher.update(nn.Sequential(nn.Linear(4, 8)))
