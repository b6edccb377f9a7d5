"""Streaming: per-sample champion losses into a drift monitor; an EMA of online-updated weights.

The monitor (continual.drift.DriftMonitor: Page-Hinkley, warm-started on the champion's
retention losses, thresholds spent over doubling epochs) is saved after every run and resumed
for the same champion, so its false-alarm rate holds over the champion's whole life.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from continual.drift import AlphaSpending, DriftMonitor, within_batch_order
from continual.inference import per_example_loss
from continual.streaming import EMATeacher
from continual.training import task_loss
from evergreen.config import EvergreenConfig
from tasks.common import frame_to_tensors
from tasks.events import emit
from tasks.memory import DataMemory
from tasks.state import ModelState


@dataclass
class StreamReport:
    ema: ModelState  # the EMA teacher after the stream: the challenger if `promote_ema`
    samples: int = 0
    drift_at: list[dict[str, Any]] = field(default_factory=list)
    threshold: float = 0.0
    mean_loss: float = 0.0


def monitor_state_file(cfg: EvergreenConfig) -> Path:
    return cfg.home_path / "stream" / f"{cfg.registry.name}-page-hinkley.json"


def monitor_settings(cfg: EvergreenConfig) -> dict[str, Any]:
    """The stream config's knobs as DriftMonitor keyword arguments."""
    s = cfg.stream
    spending = AlphaSpending(false_alarm_rate=s.false_alarm_rate, window=s.window)
    return {
        "spending": spending,
        "delta": s.ph_delta,
        "min_samples": s.ph_min_samples,
        "threshold": s.ph_threshold,
    }


def load_monitor(cfg: EvergreenConfig, champion: ModelState, memory: DataMemory) -> DriftMonitor:
    """Resume this champion's monitor, or start one warmed and calibrated on its retention
    losses (held-out gate rows of the batches it learned: the known-stable period)."""
    knobs = monitor_settings(cfg)
    wanted = {
        "false_alarm_rate": knobs["spending"].false_alarm_rate,
        "window": knobs["spending"].window,
        **{k: knobs[k] for k in ("delta", "min_samples", "threshold")},
    }
    path = monitor_state_file(cfg)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("champion") == champion.version and "monitor" in saved:  # else old format
            monitor = DriftMonitor.from_state_dict(saved["monitor"])
            if {k: monitor.settings()[k] for k in wanted} == wanted:
                return monitor
            get_run_logger().info("stream: monitor settings changed, recalibrating")
    retention = memory.rows("gate", champion.learned)
    if len(retention) < 2:
        raise ValueError(
            f"the data memory holds {len(retention)} held-out gate rows of the champion's batches "
            f"{sorted(champion.learned)}; the drift monitor needs them as its stable reference"
        )
    X, y = frame_to_tensors(retention, champion.spec, cfg.data.label)
    return DriftMonitor(per_example_loss(champion.model, X, y), **knobs)


def save_monitor(cfg: EvergreenConfig, champion: ModelState, monitor: DriftMonitor) -> None:
    path = monitor_state_file(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"champion": champion.version, "monitor": monitor.state_dict()}))
    tmp.replace(path)


@task(cache_policy=NO_CACHE, timeout_seconds=3600)
def monitor_stream(
    cfg: EvergreenConfig,
    champion: ModelState,
    frames: list[pd.DataFrame],
    batch_ids: list[str],
    memory: DataMemory,
) -> StreamReport:
    """Feed micro-batches through the champion: losses → drift monitor; online SGD → EMA teacher."""
    s = cfg.stream
    monitor = load_monitor(cfg, champion, memory)
    student = champion.clone_model()
    teacher = EMATeacher(student, decay=s.ema_decay)
    optimizer = torch.optim.SGD(student.parameters(), lr=s.lr)
    drift_at: list[dict[str, Any]] = []
    losses: list[float] = []
    for batch_id, frame in zip(batch_ids, frames, strict=True):
        # files are often sorted by class or time, which looks like drift: shuffle, seeded
        shuffled = frame.iloc[within_batch_order(len(frame), batch_id)]
        X, y = frame_to_tensors(shuffled, champion.spec, cfg.data.label)
        for start in range(0, len(X), s.micro_batch):
            xb, yb = X[start : start + s.micro_batch], y[start : start + s.micro_batch]
            for loss in per_example_loss(champion.model, xb, yb):
                losses.append(float(loss))
                if monitor.update(loss):
                    alarm = {"batch_id": batch_id, "sample": len(losses)}
                    drift_at.append({**alarm, "threshold": monitor.threshold})
            _online_step(student, optimizer, xb, yb)
            teacher.update(student)
    save_monitor(cfg, champion, monitor)
    report = StreamReport(
        ema=replace(champion, model=teacher.module.eval(), version=None),
        samples=len(losses),
        drift_at=drift_at,
        threshold=monitor.threshold,
        mean_loss=float(sum(losses) / max(len(losses), 1)),
    )
    _announce(cfg, report, batch_ids, champion.version)
    return report


def _online_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor
) -> None:
    """One SGD step on the training loop's loss (`task_loss`): cross-entropy of the labels, or
    for a causal LM the next-token loss of the ids (its labels are placeholders)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = task_loss(model, model(xb), xb, yb)
    loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
    optimizer.step()
    model.eval()


def _announce(
    cfg: EvergreenConfig, report: StreamReport, batch_ids: list[str], champion: str | None
) -> None:
    """Log the outcome; on drift, emit the event whose payload the triggered update receives
    (its `trigger` parameter): where the alarm fired, on which champion, by which statistic."""
    logger = get_run_logger()
    if not report.drift_at:
        logger.info("stream: %d samples, no drift (h=%.3f)", report.samples, report.threshold)
        return
    first = report.drift_at[0]
    logger.warning("stream: drift detected at %s (%d alarms)", first, len(report.drift_at))
    emit(
        "evergreen.drift.detected",
        cfg,
        {
            "source": "stream-monitor",
            "statistic": "page-hinkley",
            "champion": champion or "none",
            "batch_id": first["batch_id"],
            "sample": first["sample"],
            "alarms": len(report.drift_at),
            "threshold": first["threshold"],
            "mean_loss": round(report.mean_loss, 6),
            "batches": ",".join(batch_ids),
        },
    )
