"""What a training run records in MLflow beyond the model: config, curves, datasets, evaluation.

A person opening a version's run in the MLflow UI should find, without reading tags:

- **Parameters**: the effective configuration, flattened (`method`, `ewc.lambda`, `train.lr`,
  `daily.lora_r`, `gate.confidence`, …) — `flatten_params`.
- **Metrics**: the loss curve (`train.loss` per step), timings (`time.*_s`), the gate's paired
  statistics (`gate.*`), per-class precision/recall of champion and challenger
  (`eval.<model>.precision.<class>`); the gate and evaluation metrics are also linked to the
  logged model (MLflow 3 `model_id`) and to the dataset they were computed on, so the model page
  lists them.
- **Datasets** (`mlflow.data` + `log_input`): the rows it trained on, selected with, was gated
  on, and the retention set, each with a digest, its landing-zone source and its context.
- **Artifacts**: `evaluation/<model>_per_class.json` tables and `evaluation/confusion.png`.

Everything here logs into the active fluent run (see `pyfunc_model.logging_run`).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.data.pandas_dataset import from_pandas
from mlflow.entities import Metric

PARAM_VALUE_LIMIT = 6000  # MLflow's cap on a param value
_BATCH = 1000  # metrics per log_batch call (MLflow's limit)
DATASET_CONTEXTS = ("train", "selection", "gate", "retention")


@dataclass(frozen=True)
class DatasetRecord:
    """Rows a run used, named for people: e.g. context "gate", source the landing batches."""

    context: str
    frame: pd.DataFrame
    name: str
    source: str
    targets: str | None = None


@dataclass(frozen=True)
class ClassTable:
    """One model's per-class evaluation (from `continual.classification.ClassReport`)."""

    model: str  # "champion" | "challenger"
    metrics: dict[str, float]
    rows: list[dict[str, Any]]
    confusion: list[list[int]]
    classes: list[str]


@dataclass(frozen=True)
class RunRecord:
    """Everything a registration logs on its run besides the model and lineage tags."""

    params: dict[str, str] = field(default_factory=dict)
    curves: dict[str, tuple[float, ...]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    datasets: tuple[DatasetRecord, ...] = ()
    model_metrics: dict[str, float] = field(default_factory=dict)
    gate_dataset: str | None = None  # context whose dataset the model metrics are linked to
    class_tables: tuple[ClassTable, ...] = ()
    links: dict[str, str] = field(default_factory=dict)  # tag → URL (e.g. Data Docs pages)


def flatten_params(nested: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys → strings: {"train": {"lr": 0.1}} → {"train.lr": "0.1"}.

    Lists become JSON (`[0.0, 1.0]`), None becomes "none", values are capped at MLflow's limit.
    """
    flat: dict[str, str] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(list(value), default=str)[:PARAM_VALUE_LIMIT]
        else:
            flat[name] = ("none" if value is None else str(value))[:PARAM_VALUE_LIMIT]
    return flat


def log_curves(client: MlflowClient, run_id: str, curves: Mapping[str, tuple[float, ...]]) -> None:
    """Each curve as one metric with `step` = index (the MLflow UI draws it as a chart)."""
    stamp = int(time.time() * 1000)
    metrics = [
        Metric(name, float(value), stamp, step)
        for name, values in curves.items()
        for step, value in enumerate(values)
    ]
    for start in range(0, len(metrics), _BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + _BATCH])


def log_datasets(records: tuple[DatasetRecord, ...]) -> dict[str, Any]:
    """`log_input` every non-empty dataset into the active run; context → mlflow dataset."""
    logged: dict[str, Any] = {}
    for record in records:
        if record.frame.empty:
            continue
        with warnings.catch_warnings():  # MLflow's source-resolution and integer-schema hints
            warnings.simplefilter("ignore")
            dataset = from_pandas(
                record.frame.reset_index(drop=True),
                source=record.source,
                name=record.name,
                targets=record.targets,
            )
            mlflow.log_input(dataset, context=record.context)
        logged[record.context] = dataset
    return logged


def log_record(record: RunRecord, run_id: str, model_id: str | None, client: MlflowClient) -> None:
    """Log `record` into the active run `run_id`, linking metrics to the logged model."""
    if record.params:
        mlflow.log_params(record.params)
    log_curves(client, run_id, record.curves)
    if record.timings:
        mlflow.log_metrics({k: float(v) for k, v in record.timings.items()})
    datasets = log_datasets(record.datasets)
    linked = dict(record.model_metrics)
    for table in record.class_tables:
        linked.update(table.metrics)
    if linked:
        dataset = datasets.get(record.gate_dataset or "")
        mlflow.log_metrics(linked, model_id=model_id, dataset=dataset)
    _log_class_tables(record.class_tables)
    if record.links:
        mlflow.set_tags(record.links)


def _log_class_tables(tables: tuple[ClassTable, ...]) -> None:
    """Per-class tables (shown as tables in the run's artifact view) and one confusion figure."""
    for table in tables:
        mlflow.log_table(pd.DataFrame(table.rows), f"evaluation/{table.model}_per_class.json")
    if tables:
        mlflow.log_figure(confusion_figure(tables), "evaluation/confusion.png")


def confusion_figure(tables: tuple[ClassTable, ...]) -> Any:
    """Side-by-side confusion matrices (rows true, columns predicted), counts written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables), 4), squeeze=False)
    for axis, table in zip(axes[0], tables, strict=True):
        axis.imshow(table.confusion, cmap="Greens")
        ticks = range(len(table.classes))
        axis.set_xticks(ticks, table.classes)
        axis.set_yticks(ticks, table.classes)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        axis.set_title(table.model)
        for i, row in enumerate(table.confusion):
            for j, count in enumerate(row):
                axis.text(j, i, str(count), ha="center", va="center", fontsize=7)
    figure.tight_layout()
    plt.close(figure)
    return figure
