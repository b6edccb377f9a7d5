"""Drift monitoring with a lifetime false-alarm bound (real-time cadence).

An h calibrated for N samples fires far more often over 10N, and a monitor resumed run after
run has no horizon. `DriftMonitor` therefore spends a lifetime false-alarm budget α over
doubling epochs (`AlphaSpending`): epoch k lasts window·2^k samples, restarts the detector
(`continual.page_hinkley.PageHinkley`) from its warm start and uses h calibrated for that
length at rate α·2^−(k+1); the rates sum to α, which bounds the false-alarm probability of a
stable stream of any length.
Feed each batch in a random order (`within_batch_order`): files sorted by class or time look
like drift.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from continual.page_hinkley import Mode, PageHinkley, calibrate_threshold, check_params


def within_batch_order(n: int, key: str) -> np.ndarray:
    """A random permutation of range(n) that is the same every time for the same key.

    Files are often sorted by class or time, and a sorted batch looks like drift to a
    detector; feed each batch in this order, keyed by its id so reruns see the same stream.
    """
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).permutation(n)


@dataclass(frozen=True)
class AlphaSpending:
    """How a lifetime false-alarm budget α is spent: over doubling epochs.

    Epoch k = 0, 1, 2, … covers `window`·2^k samples, and a detector restarted at its start
    may raise a false alarm in it with probability α·2^−(k+1). The rates sum to α, so by the
    union bound a stable stream of any length, however long it is monitored, raises a false
    alarm with probability at most α. (A threshold for a fixed horizon N instead fires ever
    more often past N: resumed for 10N its rate is many times the target.)

    Args:
        false_alarm_rate: α, in (0, 1).
        window: length of epoch 0 in samples (>= 1).

    Raises:
        ValueError: either is out of range.
    """

    false_alarm_rate: float = 0.01
    window: int = 1000

    def __post_init__(self) -> None:
        if not 0.0 < self.false_alarm_rate < 1.0 or self.window < 1:
            raise ValueError(
                "alpha spending needs false_alarm_rate in (0, 1) and window >= 1, got "
                f"{self.false_alarm_rate} and {self.window}"
            )

    def epoch_of(self, position: int) -> int:
        """The epoch holding the sample at 0-based `position`."""
        return (position // self.window + 1).bit_length() - 1

    def epoch_start(self, epoch: int) -> int:
        """0-based position of the first sample of `epoch`."""
        return self.window * ((1 << epoch) - 1)

    def epoch_length(self, epoch: int) -> int:
        return self.window << epoch

    def epoch_rate(self, epoch: int) -> float:
        """False-alarm probability `epoch` may spend."""
        return self.false_alarm_rate / 2.0 ** (epoch + 1)


class DriftMonitor:
    """Page-Hinkley on a loss stream whose false-alarm probability holds over its whole life.

    Warm start: the detector first sees the stable losses (shuffled, untested), so its running
    mean is the reference loss and a stream shifted from its first sample still accumulates
    evidence against it. Epochs (`AlphaSpending`): at the start of epoch k the detector
    returns to that warm state with threshold h_k, calibrated when the epoch is first entered
    at the epoch's rate on bootstrap warm-ups plus epoch-long streams (`calibrate_threshold`,
    exponential tail) — bootstrapping the warm-up too makes h allow for the sampling error of
    the reference mean itself. After an alarm it returns to the warm state too (same epoch and h), so a
    lasting shift keeps alarming. `state_dict` holds everything: a stream split over many runs
    fires where it would in one.

    Args:
        stable: losses from a known-stable period (e.g. the champion on its retention set).
        spending: the false-alarm budget and epoch-0 length.
        delta, min_samples, alpha, mode: as for PageHinkley.
        n_resamples: bootstrap streams per calibration; seed: makes shuffle and bootstrap
            reproducible.
        threshold: a fixed h for every epoch instead of calibration (no false-alarm bound).

    Attributes:
        position: samples seen; epoch: the current epoch; threshold: its h.
    """

    def __init__(
        self,
        stable: Sequence[float] | np.ndarray,
        *,
        spending: AlphaSpending = AlphaSpending(),
        delta: float = 0.005,
        min_samples: int = 30,
        alpha: float = 1 - 0.0001,
        mode: Mode = "up",
        n_resamples: int = 500,
        seed: int = 0,
        threshold: float | None = None,
    ) -> None:
        values = np.asarray(stable, dtype=np.float64).ravel()
        if len(values) < 2 or not np.isfinite(values).all():
            raise ValueError(f"need at least 2 finite stable losses, got {len(values)} values")
        check_params(delta, threshold or 0.0, min_samples, alpha, mode)
        self.spending, self.n_resamples, self.seed = spending, int(n_resamples), int(seed)
        self.fixed_threshold = None if threshold is None else float(threshold)
        self._stable = values
        warm = PageHinkley(
            delta=delta, threshold=math.inf, min_samples=min_samples, alpha=alpha, mode=mode
        )
        for x in values[np.random.default_rng(seed).permutation(len(values))]:
            warm.update(x)
        self._warm = {k: v for k, v in warm.state_dict().items() if k != "threshold"}
        self._detector = warm
        self._thresholds: list[float] = []
        self.position = self.epoch = 0
        self._rearm()

    @property
    def threshold(self) -> float:
        return self._detector.threshold

    def settings(self) -> dict[str, Any]:
        """The knobs this monitor was built with (a resumed monitor keeps them)."""
        return {
            "false_alarm_rate": self.spending.false_alarm_rate,
            "window": self.spending.window,
            "delta": self._detector.delta,
            "min_samples": self._detector.min_samples,
            "alpha": self._detector.alpha,
            "mode": self._detector.mode,
            "n_resamples": self.n_resamples,
            "seed": self.seed,
            "threshold": self.fixed_threshold,
        }

    def update(self, x: float) -> bool:
        """Feed one loss; True when drift is detected at it.

        Raises:
            ValueError: x is NaN or infinite.
        """
        x = float(x)
        if not math.isfinite(x):
            raise ValueError(f"drift monitor got a non-finite loss {x} at sample {self.position}")
        if self.position == self.spending.epoch_start(self.epoch + 1):
            self.epoch += 1
            self._rearm()
        self.position += 1
        if not self._detector.update(x):
            return False
        self._rearm()
        return True

    def threshold_for(self, epoch: int) -> float:
        """h of `epoch`, calibrated on first use and kept (in the state too)."""
        while len(self._thresholds) <= epoch:
            self._thresholds.append(self._calibrate(len(self._thresholds)))
        return self._thresholds[epoch]

    def _rearm(self) -> None:
        threshold = self.threshold_for(self.epoch)
        self._detector.load_state_dict({**self._warm, "threshold": threshold})

    def _calibrate(self, epoch: int) -> float:
        if self.fixed_threshold is not None:
            return self.fixed_threshold
        ph = self._detector
        return calibrate_threshold(
            self._stable,
            delta=ph.delta,
            min_samples=ph.min_samples,
            false_alarm_rate=self.spending.epoch_rate(epoch),
            n_resamples=self.n_resamples,
            stream_length=self.spending.epoch_length(epoch),
            seed=int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]),
            alpha=ph.alpha,
            mode=ph.mode,
            warmup=len(self._stable),
            tail="exponential",
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, JSON-able (floats round-trip exactly)."""
        return {
            "settings": self.settings(),
            "stable": self._stable.tolist(),
            "thresholds": list(self._thresholds),
            "position": self.position,
            "epoch": self.epoch,
            "warm": dict(self._warm),
            "detector": self._detector.state_dict(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> DriftMonitor:
        """A monitor resumed from `state_dict()`, without recalibrating.

        Raises:
            ValueError: keys are missing or values are invalid.
        """
        keys = {"settings", "stable", "thresholds", "position", "epoch", "warm", "detector"}
        missing = sorted(keys - set(state))
        if missing or len(state["thresholds"]) <= state["epoch"]:
            raise ValueError(f"drift monitor state lacks {missing or ['thresholds']}")
        knobs = state["settings"]
        monitor = cls.__new__(cls)
        monitor.spending = AlphaSpending(knobs["false_alarm_rate"], knobs["window"])
        monitor.n_resamples, monitor.seed = int(knobs["n_resamples"]), int(knobs["seed"])
        monitor.fixed_threshold = knobs["threshold"]
        monitor._stable = np.asarray(state["stable"], dtype=np.float64)
        monitor._warm = dict(state["warm"])
        monitor._thresholds = [float(h) for h in state["thresholds"]]
        monitor.position, monitor.epoch = int(state["position"]), int(state["epoch"])
        monitor._detector = PageHinkley()
        monitor._detector.load_state_dict(state["detector"])
        return monitor
