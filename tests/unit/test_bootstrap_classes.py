"""A first champion trained without some of data.classes says so (tasks.train_bootstrap)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from continual.models import ModelSpec
from evergreen.config import EvergreenConfig, load_config
from tasks.train_bootstrap import missing_classes, warn_missing_classes
from tests.digits_pipeline import write_config


def _spec(classes: list[object]) -> ModelSpec:
    return ModelSpec(
        family="mlp", n_features=1, n_classes=len(classes), feature_columns=["x"], classes=classes
    )


def _config(tmp_path: Path) -> EvergreenConfig:
    (tmp_path / "landing").mkdir()
    return load_config(write_config(tmp_path, tmp_path / "landing", tmp_path / "home"))


def test_missing_classes_compares_labels_as_text() -> None:
    labels = pd.Series([0, 1, 1, 0])
    assert missing_classes(_spec(["0", "1", "2"]), labels) == ["2"]
    assert missing_classes(_spec([0, 1]), labels) == []


def test_a_bootstrap_on_one_class_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    frame = pd.DataFrame({"x": [0.1, 0.2], "label": ["cat", "cat"]})
    with caplog.at_level(logging.WARNING):
        warn_missing_classes(_config(tmp_path), _spec(["cat", "dog", "owl"]), frame)
    assert "1 of the 3 classes" in caplog.text
    assert "['dog', 'owl']" in caplog.text and "every row" in caplog.text


def test_a_bootstrap_on_every_class_is_quiet(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    frame = pd.DataFrame({"x": [0.1, 0.2], "label": ["cat", "dog"]})
    with caplog.at_level(logging.WARNING):
        warn_missing_classes(_config(tmp_path), _spec(["cat", "dog"]), frame)
    assert caplog.text == ""
