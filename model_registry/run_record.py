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
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

PARAM_VALUE_LIMIT = 6000  # MLflow's cap on a param value
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


def _curve_metrics(curves: Mapping[str, tuple[float, ...]], stamp: int) -> list[Metric]:
    """Each curve as one metric with `step` = index (the MLflow UI draws it as a chart)."""
    return [
        Metric(name, float(value), stamp, step)
        for name, values in curves.items()
        for step, value in enumerate(values)
    ]


def log_datasets(
    records: tuple[DatasetRecord, ...], client: MlflowClient | None = None, run_id: str = ""
) -> dict[str, Any]:
    """Every non-empty dataset as an input of the run (one `log_inputs` call with `client` and
    `run_id`, else `log_input` into the active run); context → mlflow dataset."""
    logged: dict[str, Any] = {}
    # MLflow's source-resolution and integer-schema hints: the schema is inferred lazily, when
    # the dataset is turned into an entity or logged, so the filter spans the logging too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for record in records:
            if record.frame.empty:
                continue
            logged[record.context] = from_pandas(
                record.frame.reset_index(drop=True),
                source=record.source,
                name=record.name,
                targets=record.targets,
            )
        if client is None or not run_id:
            for context, dataset in logged.items():
                mlflow.log_input(dataset, context=context)
        elif logged:
            client.log_inputs(
                run_id,
                datasets=[
                    DatasetInput(dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, c)])
                    for c, dataset in logged.items()
                ],
            )
    return logged


def log_record(record: RunRecord, run_id: str, model_id: str | None, client: MlflowClient) -> None:
    """Log `record` into the active run `run_id`, linking metrics to the logged model.

    The datasets go in one `log_inputs`, and params, curves, timings, linked metrics and link
    tags in one `log_batch` (MLflow chunks it to its limits): the fluent calls this replaces
    were a store round trip and commit each. The metrics are linked as the fluent API linked
    them: timings to the model logged in the run, the gate and evaluation metrics to the model
    and the gate dataset, the curves to neither (they were logged through the client).
    """
    datasets = log_datasets(record.datasets, client, run_id)
    linked = dict(record.model_metrics)
    for table in record.class_tables:
        linked.update(table.metrics)
    dataset = datasets.get(record.gate_dataset or "") if linked else None
    stamp = int(time.time() * 1000)
    metrics = _curve_metrics(record.curves, stamp)
    metrics += [
        Metric(k, float(v), stamp, 0, model_id=model_id, run_id=run_id)
        for k, v in record.timings.items()
    ]
    metrics += [
        Metric(
            k,
            float(v),
            stamp,
            0,
            model_id=model_id,
            dataset_name=dataset.name if dataset is not None else None,
            dataset_digest=dataset.digest if dataset is not None else None,
            run_id=run_id,
        )
        for k, v in linked.items()
    ]
    client.log_batch(
        run_id,
        metrics=metrics,
        params=[Param(k, str(v)) for k, v in record.params.items()],
        tags=[RunTag(k, str(v)) for k, v in record.links.items()],
    )
    _log_class_tables(record.class_tables)


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

    width = 4.2 * len(tables)
    figure, axes = plt.subplots(1, len(tables), figsize=(width, 4), squeeze=False)
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
    _fit_margins(figure, width, max((len(str(c)) for t in tables for c in t.classes), default=1))
    plt.close(figure)
    return figure


def _fit_margins(figure: Any, width: float, label_chars: int) -> None:
    """Margins that hold the titles, axis labels and tick labels of `label_chars` characters.

    What `tight_layout` decides, estimated from the text sizes instead of measured: it lays
    out every text of the figure (200 counts for ten classes) once more before saving, a
    third of the figure's cost, every registration.
    """
    side = 0.5 + 0.09 * label_chars  # inches: y label, ticks, tick labels (≈ 0.09 in a char)
    n = len(figure.axes)
    axis_width = (width - 0.15 - side * n) / n
    figure.subplots_adjust(
        left=side / width,
        right=1 - 0.15 / width,
        bottom=0.6 / 4,
        top=1 - 0.35 / 4,
        wspace=side / max(axis_width, 0.5),
    )
