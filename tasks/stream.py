"""Streaming: per-sample champion losses into Page-Hinkley; an EMA of online-updated weights."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from continual.streaming import EMATeacher, PageHinkley, calibrate_threshold
from continual.training import per_example_loss
from evergreen.config import EvergreenConfig
from tasks.common import frame_to_tensors
from tasks.events import emit
from tasks.state import ModelState


@dataclass
class StreamReport:
    samples: int = 0
    drift_at: list[dict] = field(default_factory=list)
    threshold: float = 0.0
    mean_loss: float = 0.0
    ema: ModelState | None = None


def monitor_state_file(cfg: EvergreenConfig) -> Path:
    return cfg.home_path / "stream" / f"{cfg.registry.name}-page-hinkley.json"


def load_detector(cfg: EvergreenConfig, champion: ModelState, stream_length: int) -> PageHinkley:
    """Resume the detector for this champion, or calibrate and warm a new one on its retention
    losses (held-out rows of every earlier batch: the known-stable period)."""
    s = cfg.stream
    path = monitor_state_file(cfg)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("champion") == champion.version:
            detector = PageHinkley(
                delta=s.ph_delta, threshold=saved["threshold"], min_samples=s.ph_min_samples
            )
            detector.load_state_dict(saved["detector"])
            return detector
    X, y = frame_to_tensors(champion.retention, champion.spec, cfg.data.label)
    stable = np.random.default_rng(0).permutation(per_example_loss(champion.model, X, y))
    threshold = s.ph_threshold
    if threshold is None:
        threshold = calibrate_threshold(
            stable,
            delta=s.ph_delta,
            min_samples=s.ph_min_samples,
            stream_length=len(stable) + stream_length,
        )
    detector = PageHinkley(delta=s.ph_delta, threshold=threshold, min_samples=s.ph_min_samples)
    # Warm start on the known-stable losses: the running mean becomes the champion's reference
    # loss, so a shift in the incoming stream accumulates against it rather than against itself.
    for loss in stable:
        detector.update(float(loss))
    return detector


def save_detector(cfg: EvergreenConfig, champion: ModelState, detector: PageHinkley) -> None:
    path = monitor_state_file(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                "champion": champion.version,
                "threshold": detector.threshold,
                "detector": detector.state_dict(),
            }
        )
    )
    tmp.replace(path)


@task(cache_policy=NO_CACHE, timeout_seconds=3600)
def monitor_stream(
    cfg: EvergreenConfig, champion: ModelState, frames: list[pd.DataFrame], batch_ids: list[str]
) -> StreamReport:
    """Feed micro-batches through the champion: losses → Page-Hinkley; online SGD → EMA teacher."""
    s = cfg.stream
    detector = load_detector(cfg, champion, max(sum(len(f) for f in frames), 100))
    student = champion.clone_model()
    teacher = EMATeacher(student, decay=s.ema_decay)
    optimizer = torch.optim.SGD(student.parameters(), lr=s.lr)
    report = StreamReport(threshold=detector.threshold)
    losses: list[float] = []
    for batch_id, frame in zip(batch_ids, frames, strict=True):
        X, y = frame_to_tensors(frame, champion.spec, cfg.data.label)
        for start in range(0, len(X), s.micro_batch):
            xb, yb = X[start : start + s.micro_batch], y[start : start + s.micro_batch]
            for loss in per_example_loss(champion.model, xb, yb):
                losses.append(float(loss))
                if detector.update(float(loss)):
                    report.drift_at.append({"batch_id": batch_id, "sample": len(losses)})
            _online_step(student, optimizer, xb, yb)
            teacher.update(student)
    report.samples, report.mean_loss = len(losses), float(sum(losses) / max(len(losses), 1))
    save_detector(cfg, champion, detector)
    teacher.module.eval()
    report.ema = ModelState(
        model=teacher.module,
        spec=champion.spec,
        ewc=champion.ewc,
        buffer=champion.buffer,
        retention=champion.retention,
    )
    _announce(cfg, report, batch_ids)
    return report


def _online_step(model, optimizer, xb, yb) -> None:
    model.train()
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(xb), yb).backward()
    optimizer.step()
    model.eval()


def _announce(cfg: EvergreenConfig, report: StreamReport, batch_ids: list[str]) -> None:
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
            "batch_id": first["batch_id"],
            "sample": first["sample"],
            "alarms": len(report.drift_at),
            "threshold": report.threshold,
            "batches": ",".join(batch_ids),
        },
    )
