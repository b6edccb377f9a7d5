"""The embedded demo: a drifting timeline of real digits through every cadence, in calendar order.

Run: `make demo` (or `evergreen demo`). No server to start: Prefect runs ephemeral, MLflow uses
SQLite + a local artifact folder under the demo home. It prints a timeline table and writes a
Markdown + PNG report comparing the champion with a naive fine-tune baseline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from rich.console import Console
from rich.table import Table

from continual.training import TrainSettings, accuracy, train
from data_plane.landing import BatchReadError, data_columns, open_landing, read_batch
from data_plane.splits import ThreeWaySplit, split_three_way
from evergreen.config import EvergreenConfig, load_config
from flows.demo_data import DemoBatch, build_demo_landing, demo_config_dict
from flows.registry import run_flow
from flows.report import TimelineRow, timeline_table, write_report
from tasks.common import frame_to_tensors
from tasks.merge import lineage_versions
from tasks.promote import load_champion

CADENCE_FLOW = {"daily": "daily-lora", "weekly": "weekly-replay", "monthly": "monthly-finetune"}


@dataclass
class Holdouts:
    """Each valid batch's held-out rows (the same split the flows use), in timeline order."""

    frames: dict[str, pd.DataFrame] = field(default_factory=dict)

    def seen(self, until: str) -> list[str]:
        return [b for b in self.frames if b <= until]


def load_holdouts(cfg: EvergreenConfig, batches: list[DemoBatch]) -> Holdouts:
    zone, columns, holdouts = open_landing(cfg.data.landing), data_columns(cfg.data), Holdouts()
    for batch in batches:
        try:
            frame = read_batch(zone, batch.batch_id, cfg.data)[columns]
            holdout = _split(cfg, frame).gate
            # raises on labels outside the classes: the corrupt batch has no holdout
            frame_to_tensors(holdout, _Spec(cfg), cfg.data.label)
        except (BatchReadError, ValueError, KeyError, TypeError):
            continue
        holdouts.frames[batch.batch_id] = holdout
    return holdouts


def _split(cfg: EvergreenConfig, frame: pd.DataFrame) -> ThreeWaySplit:
    """The flows' own split (same salt and fractions), so the demo scores the gate's rows."""
    return split_three_way(
        frame,
        data_columns(cfg.data),
        select_fraction=cfg.data.select_fraction,
        gate_fraction=cfg.data.gate_fraction,
        salt=cfg.data.split_salt,
    )


class _Spec:
    """The two spec fields `frame_to_tensors` reads, straight from config."""

    def __init__(self, cfg: EvergreenConfig) -> None:
        self.feature_columns = list(cfg.data.features)
        self.classes = list(cfg.data.classes)


def accuracy_row(cfg, model, holdouts: Holdouts, until: str) -> dict[str, float]:
    spec = _Spec(cfg)
    row = {}
    for batch_id in holdouts.seen(until):
        X, y = frame_to_tensors(holdouts.frames[batch_id], spec, cfg.data.label)
        row[batch_id] = accuracy(model, X, y)
    return row


def forgetting_of(history: list[dict[str, float]]) -> float | None:
    """Mean over earlier batches of (best accuracy so far − current accuracy)."""
    if len(history) < 2:
        return None
    current, earlier = history[-1], history[:-1]
    drops = [
        max(h[b] for h in earlier if b in h) - current[b]
        for b in current
        if any(b in h for h in earlier)
    ]
    return float(np.mean(drops)) if drops else None


def retention_accuracy(row: dict[str, float], latest: str) -> float | None:
    old = [v for b, v in row.items() if b != latest]
    return float(np.mean(old)) if old else None


def naive_baseline(cfg: EvergreenConfig, batches, holdouts: Holdouts) -> dict[str, float]:
    """Plain fine-tuning on every valid batch in turn, no EWC, replay or gate: the forgetting
    baseline. Returns its retention accuracy after each batch."""
    champion = load_champion.fn(cfg)  # the bootstrap champion: same starting point
    model = champion.clone_model()
    zone, columns, results = open_landing(cfg.data.landing), data_columns(cfg.data), {}
    for batch in batches[1:]:
        if batch.batch_id not in holdouts.frames:
            continue
        frame = read_batch(zone, batch.batch_id, cfg.data)[columns]
        train_part = _split(cfg, frame).train
        X, y = frame_to_tensors(train_part, champion.spec, cfg.data.label)
        steps = cfg.monthly.train.steps
        train(model, X, y, TrainSettings(steps=steps, lr=cfg.monthly.train.lr))
        row = accuracy_row(cfg, model, holdouts, batch.batch_id)
        results[batch.batch_id] = retention_accuracy(row, batch.batch_id)
    return results


def plan_runs(batches: list[DemoBatch]) -> list[tuple[str, str, dict]]:
    """(date, flow, params) in calendar order: each batch by its cadence, the stream monitor
    over the week's arrivals before each weekly update, consolidation mid-way, a Fisher merge at
    the end."""
    runs: list[tuple[str, str, dict]] = []
    for i, batch in enumerate(batches):
        if batch.cadence == "bootstrap":
            runs.append((batch.date, "bootstrap", {"batch_ids": [batch.batch_id]}))
            continue
        if batch.cadence == "weekly":  # the stream sees the week's samples as they arrive
            runs.append((batch.date, "stream-monitor", {"until": batch.batch_id}))
        runs.append((batch.date, CADENCE_FLOW[batch.cadence], {"batch_ids": [batch.batch_id]}))
        if i == len(batches) // 2:
            runs.append((batch.date, "consolidate", {}))
    runs.append((batches[-1].date, "merge", {"versions": "champion+previous"}))
    return runs


def run_demo(home: Path, *, console: Console | None = None) -> int:
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 150)  # logs and CI: keep the tables on one line
    started = time.perf_counter()
    home.mkdir(parents=True, exist_ok=True)
    config_path = home / "evergreen.yaml"
    config_path.write_text(
        yaml.safe_dump(demo_config_dict(str(home / "landing"), str(home)), sort_keys=False)
    )
    cfg = load_config(config_path)
    batches = build_demo_landing(cfg.data.landing)
    console.print(_batches_table(batches))
    holdouts = load_holdouts(cfg, batches)
    timeline, matrix_rows = _run_calendar(cfg, config_path, batches, holdouts, console)
    console.print("[bold]naive fine-tune baseline[/bold] (same batches, no EWC/replay/gate)…")
    baseline = naive_baseline(cfg, batches, holdouts)
    for row in timeline:
        row.baseline_retention_accuracy = baseline.get(row.batch_ids[-1]) if row.batch_ids else None
    console.print(timeline_table(timeline))
    report = _write(cfg, timeline, matrix_rows, holdouts)
    console.print(f"\nreport: {report}  ({time.perf_counter() - started:.0f}s in all)")
    _explain(console, cfg, config_path)
    return 0


def _run_calendar(cfg, config_path: Path, batches, holdouts, console: Console):
    timeline: list[TimelineRow] = []
    matrix_rows: list[tuple[str, dict[str, float]]] = []
    for date, flow_name, extra in plan_runs(batches):
        params = {"config_path": str(config_path), **extra}
        if extra.get("versions") == "champion+previous":
            params["versions"] = _champion_and_previous(cfg)
        console.print(f"[bold cyan]{date}[/bold cyan] {flow_name} {extra or ''}")
        result = run_flow(flow_name, **params)
        champion = load_champion.fn(cfg)
        until = max([b for b in result.get("batch_ids") or [date]] + [date])
        row = accuracy_row(cfg, champion.model, holdouts, until)
        matrix_rows.append((f"{date} {flow_name}", row))
        new_batch = (result.get("batch_ids") or [None])[-1]
        timeline.append(
            TimelineRow(
                date=date,
                flow=flow_name,
                batch_ids=list(result.get("batch_ids") or []),
                decision=result["decision"],
                champion_version=champion.version,
                new_accuracy=row.get(new_batch) if new_batch else None,
                retention_accuracy=retention_accuracy(row, new_batch or ""),
                forgetting=forgetting_of([r for _, r in matrix_rows]),
                note="; ".join(result.get("reasons", []))[:600],
            )
        )
    return timeline, matrix_rows


def _champion_and_previous(cfg: EvergreenConfig) -> list[str]:
    """The previous and the current champion (the same version twice if there is only one)."""
    versions = lineage_versions(cfg, 2)
    return versions if len(versions) == 2 else versions * 2


def _write(cfg, timeline, matrix_rows, holdouts: Holdouts) -> Path:
    columns = list(holdouts.frames)
    matrix = np.full((len(matrix_rows), len(columns)), np.nan)
    for i, (_, row) in enumerate(matrix_rows):
        for j, batch_id in enumerate(columns):
            matrix[i, j] = row.get(batch_id, np.nan)
    labels = ([name for name, _ in matrix_rows], columns)
    return write_report(
        cfg.home_path / "reports" / "demo",
        timeline=timeline,
        accuracy_matrix=matrix,
        matrix_labels=labels,
        title="evergreen demo: drifting handwritten digits",
    )


def _batches_table(batches: list[DemoBatch]) -> Table:
    table = Table(title="demo landing zone (scikit-learn digits, drifting writers)")
    for column in ("batch", "cadence", "rows", "format", "description"):
        table.add_column(column)
    for b in batches:
        style = "red" if b.corrupt else None
        table.add_row(b.batch_id, b.cadence, str(b.rows), b.fmt, b.description, style=style)
    return table


def _explain(console: Console, cfg: EvergreenConfig, config_path: Path) -> None:
    console.print(
        "\n[bold]Look at what it produced[/bold]\n"
        f"  MLflow UI:   mlflow ui --backend-store-uri {cfg.tracking_uri} --port 5000\n"
        "               → Models → " + cfg.registry.name + " (aliases champion/challenger, "
        "lineage tags)\n"
        "  Prefect UI:  prefect server start   then http://127.0.0.1:4200 (the demo's flow runs,\n"
        "               artifacts and events are in Prefect's local database under ~/.prefect)\n"
        f"  Status:      evergreen status --config {config_path}\n"
        f"  Rollback:    evergreen rollback --config {config_path}\n"
        f"  Serve:       mlflow models serve -m models:/{cfg.registry.name}@champion "
        f"(MLFLOW_TRACKING_URI={cfg.tracking_uri})"
    )
