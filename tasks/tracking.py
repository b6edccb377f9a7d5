"""What a registration tells MLflow about itself: the `RunRecord` of a challenger.

Gathers, from the registration, the challenger's training facts (effective config, loss curve,
timing), the datasets it used by role (train / selection / gate / retention, each pointing at
its landing-zone batches), the gate's paired statistics and the per-class evaluation of champion
and challenger. `model_registry.run_record` logs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch

from evergreen.config import EvergreenConfig
from model_registry.run_record import ClassTable, DatasetRecord, RunRecord
from tasks.memory import BATCH_COLUMN

if TYPE_CHECKING:
    from tasks.promote import Registration


def landing_source(cfg: EvergreenConfig, batch_ids: list[str]) -> str:
    """The landing-zone URI of the batches (their folder when there is one, else the zone)."""
    root = cfg.data.landing.rstrip("/")
    if "://" not in root:
        root = Path(root.removeprefix("file://")).resolve().as_uri()
    return f"{root}/{batch_ids[0]}" if len(batch_ids) == 1 else root


def dataset_record(cfg: EvergreenConfig, context: str, frame: pd.DataFrame) -> DatasetRecord:
    """A dataset named by its role and batches, e.g. `gate[2026-11-21..2026-11-23]`."""
    batches = (
        sorted(frame[BATCH_COLUMN].astype(str).unique()) if BATCH_COLUMN in frame.columns else []
    )
    span = f"{batches[0]}..{batches[-1]}" if len(batches) > 1 else "".join(batches)
    return DatasetRecord(
        context=context,
        frame=frame,
        name=f"{context}[{span}]" if span else context,
        source=landing_source(cfg, batches),
        targets=cfg.data.label,
    )


def widening_params(reg: Registration) -> dict[str, str]:
    """How many input features the challenger reads with a wider std than its parent
    (`continual.standardization`): the run says when an update followed a change of scale."""
    parent = reg.parent
    new_std, old_std = reg.challenger.spec.input_std, parent.spec.input_std if parent else None
    if not new_std or not old_std or len(new_std) != len(old_std):
        return {}
    # at the model's float32 precision: a spec may hold float64 stds (the first champion's) or
    # float32 ones (a merge writes its buffers), so exact float equality would count every feature
    widened = int((torch.tensor(new_std).float() != torch.tensor(old_std).float()).sum())
    return {"standardize.widened_features": str(widened)}


def run_record(cfg: EvergreenConfig, reg: Registration) -> RunRecord:
    """The run record of a registration (see the module docstring)."""
    training = reg.challenger.training
    evaluation = reg.evaluation
    frames = {"train": reg.train_rows}
    if evaluation is not None:
        frames |= {
            "selection": evaluation.selection,
            "gate": evaluation.rows,
            "retention": evaluation.retention,
        }
    datasets = tuple(
        dataset_record(cfg, context, frame)
        for context, frame in frames.items()
        if frame is not None and not frame.empty
    )
    timings = {"time.train_s": training.seconds} if training else {}
    if evaluation is not None:
        timings["time.evaluate_s"] = evaluation.seconds
    reports = evaluation.class_reports if evaluation is not None else {}
    tables = tuple(
        ClassTable(
            model=name,
            metrics=report.metrics(f"eval.{name}"),
            rows=report.rows(),
            confusion=report.confusion.tolist(),
            classes=[str(c) for c in report.classes],
        )
        for name, report in sorted(reports.items())
    )
    return RunRecord(
        params=(dict(training.params) if training else {}) | widening_params(reg),
        curves={"train.loss": training.losses} if training and training.losses else {},
        timings=timings,
        datasets=datasets,
        model_metrics=reg.decision.to_metrics(),
        gate_dataset="gate",
        class_tables=tables,
        links={f"evergreen.data_docs.{b}": url for b, url in reg.data_docs.items()},
    )
