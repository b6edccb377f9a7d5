"""A batch too small to fill every role: with `data.min_rows` lowered to 1, a one-row batch can
land wholly in the select or gate role, and the update then had nothing to train on. That ended
in `ValueError: train: X is empty` (exit 70, "report it"); it is a configuration matter (exit 3)
with what to do."""

from __future__ import annotations

import pandas as pd
import pytest

from data_plane.splits import ThreeWaySplit, split_three_way
from evergreen.config import config_from_dict
from evergreen.errors import ConfigError, ExitCode
from tasks.memory import DataMemory
from tasks.state import ModelState
from tasks.train_start import learning_rows
from tasks.validate import PreparedData
from tests.unit.test_standardization import _mlp


def test_an_update_with_no_training_rows_is_a_config_error_not_a_crash():
    model, spec = _mlp([1.0, 1.0, 1.0])
    cfg = config_from_dict(
        {
            "data": {"features": ["f0", "f1", "f2"], "classes": [0, 1, 2], "min_rows": 1},
        }
    )
    row = pd.DataFrame({"f0": [0.5], "f1": [1.0], "f2": [2.0], "label": [1]})
    split = split_three_way(
        row, [*spec.feature_columns, "label"], select_fraction=0.1, gate_fraction=0.25, salt="s"
    )
    held_out = ThreeWaySplit(train=row.iloc[:0], select=row, gate=row.iloc[:0])
    assert len(split.train) + len(split.select) + len(split.gate) == 1
    data = PreparedData(["tiny"], splits={"tiny": held_out}, frames={"tiny": row})
    with pytest.raises(ConfigError, match=r"no training rows.*data\.min_rows") as caught:
        learning_rows(cfg, ModelState(model=model, spec=spec), data, DataMemory())
    assert caught.value.code == ExitCode.CONFIG
