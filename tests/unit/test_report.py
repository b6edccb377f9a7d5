"""The report: files, valid PNGs, every timeline row in the Markdown, metrics from a known R."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from continual import metrics
from evergreen.report import (
    CHAMPION_PNG,
    JSON_FILE,
    MATRIX_PNG,
    TimelineRow,
    timeline_markdown,
    timeline_table,
    write_report,
)

NAN = float("nan")

# Square, lower-triangular: after step i, accuracy on batches 0..i.
SQUARE = np.array([[0.90, NAN, NAN], [0.80, 0.95, NAN], [0.70, 0.85, 0.90]])
# By hand: average (0.70 + 0.85 + 0.90) / 3; forgetting ((0.90 − 0.70) + (0.95 − 0.85)) / 2;
# backward transfer ((0.70 − 0.90) + (0.85 − 0.95)) / 2.
SQUARE_EXPECTED = {"average": 0.816667, "forgetting": 0.15, "bwt": -0.15}

# More steps than batches (flow runs that train on nothing new still get a row).
RAGGED = np.array(
    [
        [0.90, NAN, NAN],
        [0.85, 0.80, NAN],
        [0.88, 0.90, NAN],
        [0.80, 0.85, 0.70],
        [0.75, 0.90, 0.60],
    ]
)
# By hand: now = [0.75, 0.90, 0.60]; best earlier = [0.90, 0.90, 0.70];
# first seen = [0.90, 0.80, 0.70].
RAGGED_EXPECTED = {"average": 0.75, "forgetting": (0.15 + 0.0 + 0.10) / 3, "bwt": -0.15 / 3}


def _timeline() -> list[TimelineRow]:
    return [
        TimelineRow("2026-09-01", "bootstrap", ["2026-09-01"], "promoted", "1", 0.91, None, None),
        TimelineRow(
            "2026-09-03",
            "daily-lora",
            ["2026-09-03"],
            "promoted",
            "2",
            0.93,
            0.90,
            0.01,
            0.88,
            note="gate passed | p=0.01",
        ),
        TimelineRow(
            "2026-09-08",
            "daily-lora",
            ["2026-09-08"],
            "rejected",
            "2",
            0.8,
            0.89,
            0.05,
            0.8,
            note="retention dropped [bold]4.1 points[/bold]",
        ),
        TimelineRow(
            "2026-10-08",
            "daily-lora",
            ["2026-10-08"],
            "quarantined",
            "2",
            None,
            None,
            None,
            note="pixel_27 is not numeric",
        ),
        TimelineRow("2026-10-12", "stream-monitor", [], "drift", "2", None, None, None),
    ]


@pytest.fixture
def written(tmp_path):
    rows = _timeline()
    labels = (["bootstrap", "daily 1", "daily 2"], ["2026-09-01", "2026-09-03", "2026-09-08"])
    path = write_report(
        tmp_path / "report",
        timeline=rows,
        accuracy_matrix=SQUARE,
        matrix_labels=labels,
        title="test report",
        extra_markdown="## Batches\n\n- the extra section",
    )
    return path, rows


def test_writes_markdown_pngs_and_json(written):
    path, _ = written
    folder = path.parent
    assert path.name == "report.md"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["report.md", CHAMPION_PNG, MATRIX_PNG, JSON_FILE]
    )  # no temporary files left behind
    for name in (CHAMPION_PNG, MATRIX_PNG):
        assert (folder / name).stat().st_size > 10_000
        with Image.open(folder / name) as image:
            image.verify()
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 300
            assert len(set(image.convert("L").getdata())) > 10  # not a blank canvas


def test_markdown_has_every_row_the_links_and_the_extra(written):
    path, rows = written
    text = path.read_text()
    assert text.startswith("# test report")
    for line in timeline_markdown(rows).splitlines():
        assert line in text
    for row in rows:
        assert f"| {row.date} | {row.flow} |" in text
    assert "gate passed \\| p=0.01" in text  # a pipe in a note does not break the table
    assert f"![champion accuracy]({CHAMPION_PNG})" in text
    assert f"![accuracy matrix]({MATRIX_PNG})" in text
    assert text.rstrip().endswith("- the extra section")
    assert "champion now: version 2" in text
    assert "2 promoted" in text and "1 quarantined" in text


def test_markdown_metrics_match_the_hand_computed_matrix(written):
    text = written[0].read_text()
    assert f"| average accuracy (latest row) | {SQUARE_EXPECTED['average']:.3f} |" in text
    assert (
        f"| forgetting (mean over earlier batches) | {SQUARE_EXPECTED['forgetting']:.3f} |" in text
    )
    assert f"| backward transfer | {SQUARE_EXPECTED['bwt']:.3f} |" in text
    payload = json.loads((written[0].parent / JSON_FILE).read_text())
    assert payload["metrics"]["average_accuracy"] == pytest.approx(
        SQUARE_EXPECTED["average"], abs=1e-6
    )
    assert payload["metrics"]["forgetting"] == pytest.approx(SQUARE_EXPECTED["forgetting"])
    assert payload["metrics"]["backward_transfer"] == pytest.approx(SQUARE_EXPECTED["bwt"])
    assert payload["accuracy_matrix"][0][1] is None  # NaN → null, valid JSON
    assert len(payload["timeline"]) == 5


def test_square_summary_is_continual_metrics():
    summary = metrics.summarize_matrix(SQUARE)
    assert summary.average_accuracy == pytest.approx(metrics.average_accuracy(SQUARE))
    assert summary.forgetting == pytest.approx(metrics.forgetting(SQUARE))
    assert summary.backward_transfer == pytest.approx(metrics.backward_transfer(SQUARE))
    assert summary.forgetting_per_batch == pytest.approx([0.2, 0.1])


def test_ragged_summary_matches_hand_computation_and_agrees_on_square():
    summary = metrics.summarize_matrix(RAGGED)
    assert summary.average_accuracy == pytest.approx(RAGGED_EXPECTED["average"])
    assert summary.forgetting == pytest.approx(RAGGED_EXPECTED["forgetting"])
    assert summary.backward_transfer == pytest.approx(RAGGED_EXPECTED["bwt"])
    assert summary.forgetting_per_batch == pytest.approx([0.15, 0.0, 0.10])
    general = metrics._ragged_summary(SQUARE)
    assert general.average_accuracy == pytest.approx(SQUARE_EXPECTED["average"], abs=1e-6)
    assert general.forgetting == pytest.approx(SQUARE_EXPECTED["forgetting"])
    assert general.backward_transfer == pytest.approx(SQUARE_EXPECTED["bwt"])


def test_ragged_matrix_report_from_more_runs_than_batches(tmp_path):
    rows = _timeline()
    path = write_report(tmp_path, timeline=rows, accuracy_matrix=RAGGED)
    text = path.read_text()
    assert (
        f"| forgetting (mean over earlier batches) | {RAGGED_EXPECTED['forgetting']:.3f} |" in text
    )
    assert "| batch 2 | 0.100 |" in text  # default column labels


def test_without_a_matrix_no_heatmap_and_a_stale_one_is_removed(tmp_path, written):
    folder = written[0].parent
    assert (folder / MATRIX_PNG).exists()
    path = write_report(folder, timeline=_timeline())
    assert not (folder / MATRIX_PNG).exists()
    assert MATRIX_PNG not in path.read_text()
    assert (folder / CHAMPION_PNG).exists()


def test_empty_timeline_still_gives_a_valid_report(tmp_path):
    path = write_report(tmp_path / "empty", timeline=[])
    assert "0 flow runs" in path.read_text()
    with Image.open(path.parent / CHAMPION_PNG) as image:
        image.verify()


def test_matrix_label_mismatch_is_explained_and_nothing_is_written(tmp_path):
    out = tmp_path / "report"
    with pytest.raises(ValueError, match=r"2 row and 3 column labels.*3×3"):
        write_report(
            out,
            timeline=_timeline(),
            accuracy_matrix=SQUARE,
            matrix_labels=(["a", "b"], ["x", "y", "z"]),
        )
    with pytest.raises(ValueError, match="2-D"):
        write_report(out, timeline=[], accuracy_matrix=np.zeros(3))
    assert not out.exists()


def test_terminal_table_shows_every_row_and_leaves_notes_to_the_markdown():
    rows = _timeline()
    rows[0].flow = "[bold]flow[/bold]"  # cells are shown as written, not as markup
    table = timeline_table(rows)
    assert table.row_count == len(rows)
    console = Console(record=True, width=240, color_system=None)
    console.print(table)
    text = console.export_text()
    for row in rows:
        assert row.date in text and row.decision in text
    assert "[bold]flow[/bold]" in text
    assert "4.1 points" not in text  # the full reasons live in report.md
    assert "4.1 points" in timeline_markdown(rows)
    assert "0.930" in text and "—" in text


def test_nan_metrics_render_as_dash(tmp_path):
    single = np.array([[0.9]])
    text = write_report(tmp_path, timeline=[], accuracy_matrix=single).read_text()
    assert "| forgetting (mean over earlier batches) | — |" in text
    assert math.isnan(metrics.summarize_matrix(single).forgetting)
