"""Text in the landing zone: what breaks a text model blocks, how the text changes informs.

Rows are real sentences (module docstrings of installed packages, `demo.text_timeline`); the
corruptions are the ones text exports really have: empty and whitespace-only cells, undecodable
bytes, a file pasted into one cell, nulls, labels outside the class set. A batch on a new topic
must be accepted with a warning.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from data_plane.gx_suite import ensure_suite
from data_plane.landing import open_landing, read_batch, write_frame
from data_plane.text_validation import text_change, text_change_failures, text_failures
from data_plane.validation import read_and_validate, validate_batch
from demo.text_timeline import make_text_frames, package_sentences
from evergreen.config import DataConfig

CLASSES = ["pandas", "torch", "mlflow", "prefect"]


def _config(**overrides) -> DataConfig:
    return DataConfig(text="text", label="label", classes=CLASSES, **overrides)


@pytest.fixture(scope="module")
def frames() -> list[pd.DataFrame]:
    return make_text_frames()


def _validate(tmp_path: Path, frame: pd.DataFrame, cfg=None, reference=None):
    cfg = cfg or _config()
    return validate_batch(frame, "b", cfg, ensure_suite(tmp_path, cfg), reference=reference)


def test_docstring_sentences_are_real_prose():
    sentences = package_sentences("pandas")
    assert len(sentences) > 100
    assert all(30 <= len(s) <= 240 and ">>>" not in s for s in sentences)
    assert len(set(sentences)) == len(sentences)


def test_timeline_rows_are_unique_and_topics_shift(frames):
    texts = pd.concat(frames)["text"]
    assert texts.is_unique
    assert set(frames[0]["label"]) == {"pandas", "torch"}
    assert frames[1]["label"].value_counts().idxmax() == "mlflow"
    assert frames[2]["label"].value_counts().idxmax() == "prefect"


def test_clean_text_batch_passes(tmp_path, frames):
    report = _validate(tmp_path, frames[0])
    assert report.success, report.failures


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("", "empty or whitespace"),
        ("   \t\n", "empty or whitespace"),
        ("caf\udce9 au lait", "not valid UTF-8"),
        (b"caf\xe9 au lait", "not valid UTF-8"),
        ("x" * 20_001, "longer than data.max_text_chars"),
        (42, "not text"),
    ],
)
def test_corrupt_text_blocks_with_a_clear_message(tmp_path, frames, value, needle):
    frame = frames[0].copy().astype({"text": object})
    frame.at[3, "text"] = value
    report = _validate(tmp_path, frame)
    assert not report.success
    messages = " ".join(f.message for f in report.failures)
    assert needle in messages, messages


def test_null_text_and_unknown_label_block(tmp_path, frames):
    frame = frames[0].copy().astype({"text": object})
    frame.at[0, "text"] = None
    frame.at[1, "label"] = "numpy"
    report = _validate(tmp_path, frame)
    assert not report.success
    columns = {f.column for f in report.failures}
    assert {"text", "label"} <= columns


def test_a_renamed_text_column_gets_text_advice(tmp_path, frames):
    """The text under another name: the extra-column finding must not send a text model's user
    to data.features (a text config refuses features); it names data.text."""
    zone = open_landing(str(tmp_path / "landing"))
    frame = frames[0].rename(columns={"text": "sentence"})
    write_frame(zone, "b", frame)
    cfg = _config()
    _, report = read_and_validate(zone, "b", cfg, ensure_suite(tmp_path / "gx", cfg))
    messages = " ".join(f.message for f in report.failures)
    assert "['sentence']" in messages and "data.text" in messages, messages
    assert "data.features" not in messages, messages


def test_a_csv_text_cell_that_reads_like_a_missing_value_is_text(tmp_path):
    """pandas' CSV reader turns the cells 'NA', 'None', 'null', 'N/A', 'nan' into missing
    values: a text batch holding such a sentence was quarantined as 'column text has 3
    missing values'. In a text batch only an empty cell is missing."""
    zone = open_landing(str(tmp_path / "landing"))
    zone.write_bytes("b", "p.csv", b"text,label\nNA,pandas\nNone,torch\nnull,mlflow\n,torch\n")
    frame = read_batch(zone, "b", _config())
    assert frame["text"].tolist()[:3] == ["NA", "None", "null"]
    assert pd.isna(frame["text"].iloc[3])  # an empty cell is still missing


def test_text_failures_are_empty_on_clean_rows(frames):
    assert text_failures(frames[1], _config()) == []


def _licence_batch(n: int = 40) -> pd.DataFrame:
    """Real text of another kind: sentences of the Apache licence an installed package ships."""
    import importlib.metadata
    import re

    text = importlib.metadata.distribution("mlflow").read_text("licenses/LICENSE.txt") or ""
    sentences = [s for s in re.split(r"(?<=[.;:])\s+", " ".join(text.split())) if len(s) > 40]
    assert len(sentences) >= n, "mlflow's LICENSE.txt is shorter than expected"
    return pd.DataFrame({"text": sentences[:n], "label": "mlflow"})


def test_new_kind_of_text_informs_and_does_not_block(tmp_path, frames):
    report = _validate(tmp_path, _licence_batch(), reference=frames[0])
    assert report.success, report.failures
    kinds = {w.expectation for w in report.warnings}
    assert "text_drift" in kinds
    change = report.statistics["text_change"]  # licence sentences are much longer
    assert change["median_chars"] > 1.5 * change["reference_median_chars"]
    assert {"new_vocabulary_share", "baseline_vocabulary_share", "new_words"} <= set(change)


def test_text_drift_blocks_when_declared(tmp_path, frames):
    cfg = _config(change={"block": ["text_drift"]})
    report = _validate(tmp_path, _licence_batch(), cfg=cfg, reference=frames[0])
    assert not report.success


def test_same_distribution_is_quiet(frames):
    both = frames[3]
    half = len(both) // 2
    report_stats = text_change(both.iloc[:half], both.iloc[half:], "text")
    assert text_change_failures(report_stats, _config()) == []


@pytest.mark.parametrize("kind", ["parquet", "csv", "jsonl"])
def test_every_file_format_lands_text(tmp_path, frames, kind):
    frame = frames[1]
    directory = tmp_path / "landing" / "2026-10-02"
    directory.mkdir(parents=True)
    path = directory / f"part.{kind}"
    if kind == "parquet":
        frame.to_parquet(path, index=False)
    elif kind == "csv":
        frame.to_csv(path, index=False)
    else:
        path.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in frame.to_dict("records"))
        )
    cfg = _config(landing=str(tmp_path / "landing"))
    zone = open_landing(cfg.landing)
    read = read_batch(zone, "2026-10-02", cfg)
    assert read["text"].tolist() == frame["text"].tolist()
    _, report = read_and_validate(zone, "2026-10-02", cfg, ensure_suite(tmp_path, cfg))
    assert report.success, report.failures


def test_invalid_utf8_in_a_csv_is_quarantined_not_crashing(tmp_path, frames):
    directory = tmp_path / "landing" / "2026-10-02"
    directory.mkdir(parents=True)
    data = frames[1].to_csv(index=False).encode("utf-8") + b'"caf\xe9 au lait",mlflow\n'
    (directory / "part.csv").write_bytes(data)
    cfg = _config(landing=str(tmp_path / "landing"))
    zone = open_landing(cfg.landing)
    frame, report = read_and_validate(zone, "2026-10-02", cfg, ensure_suite(tmp_path, cfg))
    assert not report.success
    assert "UTF-8" in " ".join(f.message for f in report.failures) or frame is None


@pytest.mark.parametrize(
    ("model", "data", "needle"),
    [
        ({"family": "mlp"}, {"text": "text"}, "model.family: hf"),
        ({"family": "hf"}, {"text": "text"}, "needs model.hf_path"),
        ({"family": "hf", "hf_path": "x"}, {"features": ["a"]}, "set data.text"),
        ({"family": "hf", "hf_path": "x"}, {"text": "t", "features": ["a"]}, "not both"),
    ],
)
def test_config_rejects_text_without_a_text_model(model, data, needle):
    from pydantic import ValidationError

    from evergreen.config import EvergreenConfig

    with pytest.raises(ValidationError, match=needle):
        EvergreenConfig(data={"classes": ["a", "b"], **data}, model=model)
