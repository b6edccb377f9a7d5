"""The evergreen report: what each flow run decided, and whether the champion kept what it knew.

`write_report` turns a timeline of flow runs (and optionally the accuracy matrix R[i][j]) into
`report.md` with two plots beside it, `champion_accuracy.png` (the champion's retention accuracy
against a naive fine-tune baseline, plus its accuracy on each new batch) and `accuracy_matrix.png`
(a heatmap of R), and `report.json` with the same numbers for machines. Every file is written to
a temporary name and renamed, so a reader never sees half a report. `timeline_table` renders the
same timeline for the terminal.

Plots use matplotlib's Agg canvas directly (no pyplot, no display, no global backend switch).
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from continual.files import atomic_write_bytes
from continual.metrics import MatrixSummary, summarize_matrix

if TYPE_CHECKING:
    import rich.table
    from matplotlib.figure import Figure

REPORT_FILE = "report.md"
MATRIX_PNG = "accuracy_matrix.png"
CHAMPION_PNG = "champion_accuracy.png"
JSON_FILE = "report.json"

_DECISION_STYLES = {
    "promoted": "bold green",
    "rejected": "red",
    "quarantined": "yellow",
    "skipped": "dim",
    "drift": "magenta",
    "rolled-back": "cyan",
}
_DECISION_MARKERS = {
    "promoted": ("^", "tab:green"),
    "rejected": ("x", "tab:red"),
    "quarantined": ("s", "goldenrod"),
    "drift": ("v", "tab:purple"),
    "rolled-back": ("<", "tab:cyan"),
}


@dataclass
class TimelineRow:
    """One flow run in the report's timeline.

    Attributes:
        date: when (usually the batch date of the demo, or the run's start date).
        flow: which flow ran (bootstrap, daily-lora, weekly-replay, ...).
        batch_ids: the landing batches it consumed.
        decision: promoted, rejected, quarantined, skipped, drift, ...
        champion_version: the champion's registry version after this run.
        new_accuracy: champion accuracy on the new batch's held-out split.
        retention_accuracy: champion accuracy on the retention set (all earlier batches).
        forgetting: retention accuracy lost against the previous champion (positive = forgot).
        baseline_retention_accuracy: what a naive fine-tune would retain, for comparison.
        joint_new_accuracy: a model trained from scratch on everything so far, on the new batch.
        joint_retention_accuracy: the same joint model on the retention set (the bound).
        note: the decision's reason or anything else worth a line.
    """

    date: str
    flow: str
    batch_ids: list[str]
    decision: str
    champion_version: str | None
    new_accuracy: float | None
    retention_accuracy: float | None
    forgetting: float | None
    baseline_retention_accuracy: float | None = None
    joint_new_accuracy: float | None = None
    joint_retention_accuracy: float | None = None
    note: str = ""


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def _cell(text: str) -> str:
    """Make text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


_COLUMNS = (
    "date",
    "flow",
    "batches",
    "decision",
    "champion",
    "new-data acc.",
    "joint new",
    "retention acc.",
    "joint retention",
    "naive retention",
    "forgetting",
    "note",
)
_MIN_WIDTHS = {"date": 10, "batches": 10, "decision": 8}
# Headers as narrow as the numbers under them (the caption spells them out), so that a
# 120-column terminal shows every column whole: rich cuts a wider header to "joint…".
_TERMINAL_HEADERS = {
    "champion": "cham-\npion",
    "new-data acc.": "new\ndata",
    "joint new": "joint\nnew",
    "retention acc.": "old\ndata",
    "joint retention": "joint\nold",
    "naive retention": "naive\nold",
    "forgetting": "forg-\netting",
}
_TERMINAL_CAPTION = (
    "new data: accuracy on the batches' gate rows; old data: on every earlier batch's "
    "(retention); joint: a model trained on every row so far; naive: plain fine-tuning"
)


def _row_cells(row: TimelineRow) -> list[str]:
    return [
        row.date,
        row.flow,
        ", ".join(row.batch_ids) or "—",
        row.decision,
        row.champion_version or "—",
        _fmt(row.new_accuracy),
        _fmt(row.joint_new_accuracy),
        _fmt(row.retention_accuracy),
        _fmt(row.joint_retention_accuracy),
        _fmt(row.baseline_retention_accuracy),
        _fmt(row.forgetting),
        row.note,
    ]


def timeline_markdown(rows: Sequence[TimelineRow]) -> str:
    """The timeline as a Markdown table, one line per flow run."""
    lines = [
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "---|" * len(_COLUMNS),
    ]
    lines += ["| " + " | ".join(_cell(c) for c in _row_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def timeline_table(rows: Sequence[TimelineRow]) -> rich.table.Table:
    """The timeline as a rich Table for the terminal (decisions coloured)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="evergreen timeline", caption=_TERMINAL_CAPTION, show_lines=False)
    for name in _COLUMNS[:-1]:  # the note (full reasons) is in report.md
        numeric = "acc" in name or name.startswith(("joint", "naive")) or name == "forgetting"
        table.add_column(
            _TERMINAL_HEADERS.get(name, name),
            justify="right" if numeric else "left",
            no_wrap=True,
            min_width=_MIN_WIDTHS.get(name),
        )
    for row in rows:
        cells = [escape(cell) for cell in _row_cells(row)[:-1]]
        if len(row.batch_ids) > 1:
            cells[2] = f"{row.batch_ids[0]} +{len(row.batch_ids) - 1}"
        style = _DECISION_STYLES.get(row.decision, "")
        cells[3] = f"[{style}]{row.decision}[/]" if style else row.decision
        table.add_row(*cells)
    return table


def _summary_markdown(rows: Sequence[TimelineRow], champion: str | None = None) -> str:
    """Counts of decisions and where the champion ended, as a short bullet list (`champion`:
    the registry's, when known — a rollback by hand is not a flow run)."""
    counts = Counter(row.decision for row in rows)
    lines = [
        f"- {len(rows)} flow runs: " + ", ".join(f"{n} {d}" for d, n in sorted(counts.items()))
    ]
    versions = [row.champion_version for row in rows if row.champion_version]
    if champion or versions:
        lines.append(f"- champion now: version {champion or versions[-1]}")
    last = next((r for r in reversed(rows) if r.retention_accuracy is not None), None)
    if last is not None:
        line = f"- latest champion retention accuracy: {_fmt(last.retention_accuracy)}"
        if last.joint_retention_accuracy is not None:
            line += f" (joint training: {_fmt(last.joint_retention_accuracy)})"
        if last.baseline_retention_accuracy is not None:
            line += f" (naive fine-tune: {_fmt(last.baseline_retention_accuracy)})"
        lines.append(line)
    return "\n".join(lines)


def _matrix_markdown(summary: MatrixSummary, cols: list[str]) -> str:
    lines = [
        "| metric | value |",
        "|---|---|",
        f"| average accuracy (latest row) | {_fmt(summary.average_accuracy)} |",
        f"| forgetting (mean over earlier batches) | {_fmt(summary.forgetting)} |",
        f"| backward transfer | {_fmt(summary.backward_transfer)} |",
    ]
    if summary.forgetting_per_batch:
        lines += ["", "| batch | forgetting |", "|---|---|"]
        lines += [
            f"| {_cell(col)} | {_fmt(value)} |"
            for col, value in zip(cols, summary.forgetting_per_batch, strict=False)
        ]
    return "\n".join(lines)


def _matrix_labels(
    matrix: np.ndarray, labels: tuple[list[str], list[str]] | None
) -> tuple[list[str], list[str]]:
    """Row/column labels for R, checked against its shape."""
    n_rows, n_cols = matrix.shape
    if labels is None:
        return [f"after step {i}" for i in range(n_rows)], [f"batch {j}" for j in range(n_cols)]
    rows, cols = list(labels[0]), list(labels[1])
    if len(rows) != n_rows or len(cols) != n_cols:
        raise ValueError(
            f"matrix_labels have {len(rows)} row and {len(cols)} column labels, but the accuracy "
            f"matrix is {n_rows}×{n_cols}: give one label per row (step) and per column (batch)"
        )
    return rows, cols


def matrix_figure(matrix: np.ndarray, rows: list[str], cols: list[str]) -> Figure:
    """Heatmap of R[i][j] with each cell annotated; unset (NaN) cells are left grey."""
    from matplotlib.figure import Figure

    n_rows, n_cols = matrix.shape
    fig = Figure(figsize=(max(5.0, 0.8 * n_cols + 2.5), max(3.5, 0.5 * n_rows + 2.0)), dpi=110)
    ax = fig.add_subplot()
    ax.set_facecolor("#dddddd")
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="accuracy")
    for (i, j), value in np.ndenumerate(matrix):
        if not math.isnan(value):
            colour = "black" if value > 0.6 else "white"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(n_cols), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n_rows), rows, fontsize=8)
    ax.set_xlabel("evaluated on batch j")
    ax.set_ylabel("after training step i")
    ax.set_title("accuracy matrix R[i][j]")
    fig.tight_layout()
    return fig


def _series(rows: Sequence[TimelineRow], name: str) -> tuple[list[int], list[float]]:
    points = [(x, getattr(r, name)) for x, r in enumerate(rows) if getattr(r, name) is not None]
    return [x for x, _ in points], [float(y) for _, y in points]


def _mark_decisions(ax: Any, rows: Sequence[TimelineRow]) -> None:
    """One marker per run on a strip along the bottom: promoted, rejected, quarantined, ..."""
    strip = ax.get_xaxis_transform()  # x in data, y in axes fraction
    for decision, (marker, colour) in _DECISION_MARKERS.items():
        xs = [x for x, r in enumerate(rows) if r.decision == decision]
        if xs:
            ax.scatter(
                xs,
                [0.03] * len(xs),
                marker=marker,
                color=colour,
                label=decision,
                transform=strip,
                clip_on=False,
            )


def champion_figure(rows: Sequence[TimelineRow]) -> Figure:
    """Champion retention and new-data accuracy per run, against joint training (the bound) and
    naive fine-tuning (the forgetting baseline) on the same rows.

    Decisions are marked on a strip along the bottom; the y axis starts just below the lowest
    accuracy so a few points of forgetting stay visible.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(8.0, 0.5 * len(rows) + 5.0), 4.5), dpi=110)
    ax = fig.add_subplot()
    lowest = 1.0
    for name, label, style, colour in (
        ("retention_accuracy", "champion: retention set", "-o", "tab:blue"),
        ("joint_retention_accuracy", "joint training: retention set", "--", "tab:blue"),
        ("baseline_retention_accuracy", "naive fine-tune: retention set", ":s", "tab:orange"),
        ("new_accuracy", "champion: new batch", "-d", "tab:green"),
        ("joint_new_accuracy", "joint training: new batch", "--", "tab:green"),
    ):
        xs, ys = _series(rows, name)
        if xs:
            ax.plot(xs, ys, style, color=colour, label=label, markersize=4)
            lowest = min(lowest, *ys)
    _mark_decisions(ax, rows)
    if lowest == 1.0:
        ax.text(
            0.5, 0.5, "no accuracy recorded yet", ha="center", va="center", transform=ax.transAxes
        )
    ax.set_ylim(max(0.0, math.floor((lowest - 0.1) * 10) / 10), 1.01)
    ax.set_xlim(-0.5, max(len(rows) - 0.5, 0.5))
    ax.set_xticks(
        range(len(rows)), [f"{r.date}\n{r.flow}" for r in rows], rotation=45, ha="right", fontsize=7
    )
    ax.set_ylabel("accuracy")
    ax.set_title("champion accuracy over time")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def _png_bytes(fig: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [_json_number(v) for v in value]
    return value


def _report_json(
    rows: Sequence[TimelineRow], matrix: np.ndarray | None, summary: MatrixSummary | None
) -> bytes:
    payload: dict[str, Any] = {"timeline": [asdict(row) for row in rows]}
    if matrix is not None and summary is not None:
        payload["accuracy_matrix"] = [[_json_number(float(v)) for v in row] for row in matrix]
        payload["metrics"] = {k: _json_number(v) for k, v in asdict(summary).items()}
    return json.dumps(payload, indent=2).encode("utf-8")


def write_report(
    out_dir: Path,
    *,
    timeline: list[TimelineRow],
    accuracy_matrix: np.ndarray | None = None,
    matrix_labels: tuple[list[str], list[str]] | None = None,
    title: str = "evergreen report",
    extra_markdown: str = "",
    champion: str | None = None,
) -> Path:
    """Write report.md, champion_accuracy.png, accuracy_matrix.png (if R is given), report.json.

    Args:
        out_dir: folder for the report (created if missing); existing files are replaced.
        timeline: the flow runs, in order.
        accuracy_matrix: R[i][j] = accuracy on batch j after step i (NaN = not measured).
        matrix_labels: (row labels, column labels) for R, e.g. step names and batch ids.
        title: the Markdown title.
        extra_markdown: appended at the end (e.g. the demo's batch list).
        champion: the champion now, from the registry (default: the last row's).

    Returns:
        The path of report.md.

    Raises:
        ValueError: the accuracy matrix is not 2-D or its labels do not match its shape.
    """
    matrix = None if accuracy_matrix is None else np.asarray(accuracy_matrix, dtype=float)
    if matrix is not None and matrix.ndim != 2:
        raise ValueError(f"accuracy_matrix must be 2-D (steps × batches), got {matrix.shape}")
    labels = None if matrix is None else _matrix_labels(matrix, matrix_labels)  # check first
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = [f"# {title}", _summary_markdown(timeline, champion), "## Timeline"]
    sections += [timeline_markdown(timeline), "## Champion accuracy over time"]
    atomic_write_bytes(out_dir / CHAMPION_PNG, _png_bytes(champion_figure(timeline)))
    sections.append(f"![champion accuracy]({CHAMPION_PNG})")
    summary = None
    if matrix is not None and labels is not None:
        summary = summarize_matrix(matrix)
        atomic_write_bytes(out_dir / MATRIX_PNG, _png_bytes(matrix_figure(matrix, *labels)))
        sections += ["## Accuracy matrix", f"![accuracy matrix]({MATRIX_PNG})"]
        sections.append(_matrix_markdown(summary, labels[1]))
    else:
        (out_dir / MATRIX_PNG).unlink(missing_ok=True)  # never leave a stale plot of an old run
    if extra_markdown.strip():
        sections.append(extra_markdown.strip())
    atomic_write_bytes(out_dir / JSON_FILE, _report_json(timeline, matrix, summary))
    report = out_dir / REPORT_FILE
    atomic_write_bytes(report, ("\n\n".join(sections) + "\n").encode("utf-8"))
    return report
