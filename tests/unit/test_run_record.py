"""What a version's MLflow run shows: config params, loss curve, datasets, linked metrics,
per-class evaluation, and a typed signature with every class probability (embedded SQLite)."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from continual.classification import class_report
from model_registry.pyfunc_model import fluent_tracking
from model_registry.registry import Registry
from model_registry.run_record import (
    ClassTable,
    DatasetRecord,
    RunRecord,
    flatten_params,
)
from tests.checkpoints import tiny_checkpoint

FEATURES = ["f0", "f1", "f2", "f3"]
CLASSES = ["cat", "dog", "eel"]


def test_class_report_matches_scikit_learn():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 300)
    predicted = np.where(rng.random(300) < 0.7, truth, rng.integers(0, 4, 300))
    predicted[predicted == 3] = 2  # class 3 is never predicted: precision 0, not NaN
    report = class_report(truth, predicted, ["a", "b", "c", "d"])
    precision, recall, _, support = precision_recall_fscore_support(
        truth, predicted, labels=[0, 1, 2, 3], zero_division=0
    )
    assert report.precision == pytest.approx(precision)
    assert report.recall == pytest.approx(recall)
    assert report.support.tolist() == support.tolist()
    assert report.confusion.tolist() == confusion_matrix(truth, predicted).tolist()
    metrics = report.metrics("eval.challenger")
    assert metrics["eval.challenger.precision.d"] == 0.0
    assert metrics["eval.challenger.accuracy"] == pytest.approx(np.mean(truth == predicted))
    with pytest.raises(ValueError, match=r"outside 0\.\.3"):
        class_report([0, 4], [0, 1], ["a", "b", "c", "d"])


def test_flatten_params_dots_lists_and_none():
    flat = flatten_params({"daily": {"train": {"lr": 0.003}, "target_modules": None}, "g": [1, 2]})
    assert flat == {"daily.train.lr": "0.003", "daily.target_modules": "none", "g": "[1, 2]"}


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """One version logged with a full run record: what every test below reads."""
    root = tmp_path_factory.mktemp("record")
    registry = Registry(
        f"sqlite:///{root}/mlflow.db",
        "record-test",
        artifact_location=(root / "mlartifacts").as_uri(),
        lock_dir=root / "locks",
    )
    checkpoint = tiny_checkpoint(root / "ckpt", 0, FEATURES, CLASSES)
    rng = np.random.default_rng(1)
    rows = pd.DataFrame(rng.normal(size=(40, 4)), columns=FEATURES).assign(
        label=rng.choice(CLASSES, 40), batch_id="2026-01-02"
    )
    report = class_report(rng.integers(0, 3, 40), rng.integers(0, 3, 40), CLASSES)
    table = ClassTable(
        "challenger", report.metrics("eval.challenger"), report.rows(), report.confusion.tolist(),
        CLASSES,
    )  # fmt: skip
    record = RunRecord(
        params={"daily.lora_r": "8", "gate.confidence": "0.95"},
        curves={"train.loss": (2.0, 1.5, 1.2, 1.1)},
        timings={"time.train_s": 1.25},
        datasets=(
            DatasetRecord("train", rows, "train[2026-01-02]", str(root / "landing/2026-01-02")),
            DatasetRecord(
                "gate", rows.head(10), "gate[2026-01-02]", "s3://bucket/landing", "label"
            ),
            DatasetRecord("retention", rows.head(0), "retention", "s3://bucket/landing"),
        ),
        model_metrics={"gate.promote": 1.0, "gate.new.lcb": -0.01},
        gate_dataset="gate",
        class_tables=(table,),
        links={"evergreen.data_docs.2026-01-02": "file:///docs/index.html"},
    )
    info = registry.log_version(
        checkpoint, lineage={"cadence": "daily"}, metrics={"drift.max_psi": 0.1}, record=record
    )
    run = registry.client.get_run(info.run_id)
    return {"registry": registry, "info": info, "run": run, "record": record}


def test_run_holds_params_curve_timing_and_links(logged):
    run, client = logged["run"], logged["registry"].client
    assert run.data.params["daily.lora_r"] == "8" and run.data.params["gate.confidence"] == "0.95"
    curve = client.get_metric_history(run.info.run_id, "train.loss")
    assert [(m.step, m.value) for m in sorted(curve, key=lambda m: m.step)] == [
        (0, 2.0),
        (1, 1.5),
        (2, 1.2),
        (3, 1.1),
    ]
    assert run.data.metrics["time.train_s"] == 1.25
    assert run.data.metrics["drift.max_psi"] == 0.1
    assert run.data.tags["evergreen.data_docs.2026-01-02"] == "file:///docs/index.html"


def test_datasets_are_run_inputs_with_context_source_and_digest(logged):
    inputs = logged["run"].inputs.dataset_inputs
    by_context = {
        next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset for d in inputs
    }
    assert sorted(by_context) == ["gate", "train"]  # an empty retention set is not logged
    gate = by_context["gate"]
    assert gate.name == "gate[2026-01-02]" and len(gate.digest) >= 8
    assert json.loads(gate.source)["uri"] == "s3://bucket/landing"
    assert json.loads(gate.profile)["num_rows"] == 10
    assert by_context["train"].digest != gate.digest


def test_gate_and_class_metrics_are_linked_to_the_logged_model(logged):
    client, run = logged["registry"].client, logged["run"]
    model_id = run.outputs.model_outputs[0].model_id
    linked = {m.key: m for m in client.get_logged_model(model_id).metrics}
    assert linked["gate.promote"].value == 1.0
    assert "eval.challenger.recall.dog" in linked
    assert linked["gate.new.lcb"].dataset_name == "gate[2026-01-02]"
    assert run.data.metrics["gate.new.lcb"] == -0.01  # and on the run
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert artifacts == {"evaluation/challenger_per_class.json", "evaluation/confusion.png"}


def test_signature_is_typed_with_every_class_probability(logged):
    with fluent_tracking(logged["registry"].tracking_uri):
        info = mlflow.models.get_model_info(logged["info"].source)
    outputs = {c.name: c.type.name for c in info.signature.outputs.inputs}
    assert list(outputs) == ["prediction", "probability"] + [f"probability_{c}" for c in CLASSES]
    assert outputs["prediction"] == "string"
    assert {outputs[f"probability_{c}"] for c in CLASSES} == {"double"}
    assert info.signature.inputs.input_names() == FEATURES
    assert info.signature.params is None  # generation params are a causal LM's only
