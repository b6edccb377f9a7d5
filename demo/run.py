"""The embedded demos: a drifting timeline through every cadence, in calendar order.

Run: `make demo` (or `evergreen demo`): real digits on the shipped tabular defaults;
`make demo-text` (or `evergreen demo --text`): real text whose topics shift, on the packaged
pretrained MiniLM encoder (`demo.text_demo`). Both go through this one driver. No server to
start: Prefect runs ephemeral, MLflow uses SQLite + a local artifact folder under the demo home.
It prints a timeline table and writes a Markdown + PNG report comparing the champion with a model
trained jointly on everything so far (the bound) and a naive fine-tune (the forgetting baseline),
both on the same training rows.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from rich.console import Console
from rich.table import Table

from continual.checkpoint import save_checkpoint
from continual.metrics import history_forgetting, retention_accuracy
from continual.models import ModelSpec
from data_plane.landing import BatchReadError, data_columns, open_landing, read_batch
from data_plane.splits import ThreeWaySplit, split_three_way
from demo import references
from demo.baselines import HeldOut, accuracy_row, joint_rows
from demo.comparison import FinalComparison, comparison_markdown, comparison_table, final_comparison
from demo.references import write_inputs
from demo.text_demo import build_text_demo_landing, text_demo_config_dict
from demo.timeline import DemoBatch, build_demo_landing, demo_config_dict
from evergreen.cadences import by_section, run_flow
from evergreen.config import EvergreenConfig, load_config
from evergreen.report import TimelineRow, timeline_table, write_report
from tasks.common import frame_to_tensors
from tasks.merge import lineage_versions
from tasks.promote import load_champion
from tasks.state import ModelState
from tasks.train_bootstrap import new_spec, text_spec


@dataclass(frozen=True)
class Scenario:
    """What differs between the demos: data, config, and which extra flows run.

    Attributes:
        title: the report's title.
        landing_title: the title of the printed batch table.
        config: (landing, home) → the evergreen.yaml mapping.
        build_landing: landing folder → the batches written there, in calendar order.
        report_dir: folder under `<home>/reports` for report.md and its plots.
        extras: also run the stream monitor before each weekly update, a consolidation
            half-way and a Fisher merge at the end (the digits demo shows every flow).
    """

    title: str
    landing_title: str
    config: Callable[[str, str], dict[str, Any]]
    build_landing: Callable[[str], list[DemoBatch]]
    report_dir: str = "demo"
    extras: bool = True


DIGITS = Scenario(
    title="evergreen demo: drifting handwritten digits",
    landing_title="demo landing zone (scikit-learn digits, drifting writers)",
    config=demo_config_dict,
    build_landing=build_demo_landing,
)
TEXT = Scenario(
    title="evergreen demo --text: shifting topics on a pretrained MiniLM encoder",
    landing_title="text demo landing zone (module docstrings of installed packages, by topic)",
    config=text_demo_config_dict,
    build_landing=build_text_demo_landing,
    report_dir="demo-text",
    extras=False,
)


def load_held_out(cfg: EvergreenConfig, batches: list[DemoBatch]) -> HeldOut:
    """Each valid batch's train and gate rows (the flows' own split); the corrupt one has none."""
    zone, columns, held_out = open_landing(cfg.data.landing), data_columns(cfg.data), HeldOut()
    for batch in batches:
        try:
            split = _split(cfg, read_batch(zone, batch.batch_id, cfg.data)[columns])
            frame_to_tensors(split.gate, _input_spec(cfg), cfg.data.label)  # raises on bad rows
        except (BatchReadError, ValueError, KeyError, TypeError):
            continue
        held_out.train[batch.batch_id], held_out.gate[batch.batch_id] = split.train, split.gate
    return held_out


def _split(cfg: EvergreenConfig, frame: pd.DataFrame) -> ThreeWaySplit:
    """The flows' own split (same salt and fractions), so the demo scores the gate's rows."""
    return split_three_way(
        frame,
        data_columns(cfg.data),
        select_fraction=cfg.data.select_fraction,
        gate_fraction=cfg.data.gate_fraction,
        salt=cfg.data.split_salt,
    )


def _input_spec(cfg: EvergreenConfig) -> ModelSpec:
    """What `frame_to_tensors` needs to read a batch: a text model's spec (its tokenizer and
    length), or the tabular columns and classes straight from config."""
    if cfg.data.text:
        return text_spec(cfg)
    return ModelSpec(
        family=cfg.model.family,
        n_features=len(cfg.data.features),
        n_classes=len(cfg.data.classes),
        feature_columns=list(cfg.data.features),
        classes=list(cfg.data.classes),
    )


def plan_runs(
    batches: list[DemoBatch], *, extras: bool = True
) -> list[tuple[str, str, dict[str, Any]]]:
    """(date, flow, params) in calendar order: each batch by its cadence; with `extras`, the
    stream monitor over the week's arrivals before each weekly update, consolidation mid-way,
    a Fisher merge at the end."""
    runs: list[tuple[str, str, dict[str, Any]]] = []
    for i, batch in enumerate(batches):
        if batch.cadence == "bootstrap":
            runs.append((batch.date, by_section("bootstrap").name, {"batch_ids": [batch.batch_id]}))
            continue
        if extras and batch.cadence == "weekly":  # the stream sees the week's samples
            runs.append((batch.date, "stream-monitor", {"until": batch.batch_id}))
        flow_name = by_section(batch.cadence).name
        runs.append((batch.date, flow_name, {"batch_ids": [batch.batch_id]}))
        if extras and i == len(batches) // 2:
            runs.append((batch.date, "consolidate", {}))
    if extras:
        runs.append((batches[-1].date, "merge", {"versions": "champion+previous"}))
    return runs


def run_demo(home: Path, *, console: Console | None = None, text: bool = False) -> int:
    """Build the landing zone, run every flow of the calendar, print and write the report.

    Args:
        home: the demo home (config, landing zone, MLflow store, reports).
        console: where to print (default: stdout).
        text: the text demo on the packaged MiniLM (`TEXT`) instead of the digits (`DIGITS`).
    """
    scenario = TEXT if text else DIGITS
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 150)  # logs and CI: keep the tables on one line
    started = time.perf_counter()
    home.mkdir(parents=True, exist_ok=True)
    config_path = home / "evergreen.yaml"
    config_path.write_text(
        yaml.safe_dump(scenario.config(str(home / "landing"), str(home)), sort_keys=False)
    )
    cfg = load_config(config_path)
    batches = scenario.build_landing(cfg.data.landing)
    console.print(_batches_table(batches, scenario.landing_title))
    held_out = load_held_out(cfg, batches)
    plan = plan_runs(batches, extras=scenario.extras)
    first = _bootstrap_batches(plan)
    with BackgroundReferences(cfg, config_path, held_out, first) as background:
        timeline, matrix_rows = _run_calendar(
            cfg, config_path, plan, held_out, console, background.after_flow
        )
        console.print("[bold]references[/bold]: joint training and naive fine-tuning, same rows…")
        references = _add_references(timeline, *background.results())
    seconds = time.perf_counter() - started
    final = final_comparison(matrix_rows[-1][1], *references)
    console.print(timeline_table(timeline))
    console.print(_verdict(timeline))
    console.print(comparison_table(final))
    report = _write(cfg, scenario, timeline, matrix_rows, held_out, final, seconds)
    console.print(f"\nreport: {report}  ({time.perf_counter() - started:.0f}s in all)")
    _explain(console, cfg, config_path)
    return 0


def _bootstrap_batches(plan: list[tuple[str, str, dict[str, Any]]]) -> list[str]:
    """The batches the calendar's first bootstrap run learns (none: no bootstrap run)."""
    name = by_section("bootstrap").name
    return next((list(params.get("batch_ids") or []) for _, f, params in plan if f == name), [])


References = tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]


class BackgroundReferences:
    """The joint and naive references, trained in a worker process while the flows run
    (`demo.references`: files in, JSON out, no pickle).

    They were the largest part of the text demo after the flows (≈ 150 of ≈ 400 s) and wait on
    nothing but the data and the first champion, while the demo's own process trains at one
    thread (`evergreen.cli.DEMO_DEFAULTS`) and leaves the second core idle. The worker trains
    joint at once, then naive once the bootstrap champion is saved. The first batch's joint model
    is the bootstrap champion itself (`demo.baselines`) when the bootstrap learned that batch
    alone.
    """

    def __init__(
        self, cfg: EvergreenConfig, config_path: Path, held_out: HeldOut, bootstrap: list[str]
    ) -> None:
        self.cfg, self.held_out = cfg, held_out
        self.order = list(held_out.gate)
        # the bootstrap flow's batches are known from the plan; its champion is checked below
        self.reuse = bool(self.order) and bootstrap == self.order[:1]
        self.directory = cfg.home_path / "references"
        shutil.rmtree(self.directory, ignore_errors=True)
        skip = self.order[:1] if self.reuse else []
        write_inputs(self.directory, str(config_path), held_out, skip)
        self.worker: subprocess.Popen[bytes] | None = None
        self.naive_ready = False
        self.first_row: dict[str, dict[str, float]] = {}

    def __enter__(self) -> BackgroundReferences:
        if self.order:
            self.worker = references.start(self.directory)
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        """Stop the worker if it still runs (the demo failed; on success it is done)."""
        if self.worker is not None and self.worker.poll() is None:
            self.worker.kill()
            self.worker.wait()

    def after_flow(self, flow_name: str, result: dict[str, Any], champion: ModelState) -> None:
        """After the bootstrap flow: take its champion as the first joint model and save it as
        the naive reference's start."""
        if flow_name != by_section("bootstrap").name or self.naive_ready or not self.order:
            return
        first = self.order[0]
        if list(result.get("batch_ids") or []) == [first]:
            self.first_row[first] = accuracy_row(
                self.cfg, champion.model, self.held_out, first, champion.spec
            )
        else:  # e.g. --keep: the bootstrap skipped, the first version is an earlier run's
            champion = _bootstrap_state(self.cfg)
        start = self.directory / "naive-start"
        save_checkpoint(start, champion.model, champion.spec)
        (start / references.READY).touch()
        self.naive_ready = True

    def results(self) -> References:
        """(joint, naive): batch → accuracy row after learning it (waits for the worker)."""
        if self.worker is None or not self.naive_ready:
            raise RuntimeError("the demo ran no bootstrap flow: no references to compare with")
        joint, naive = references.results(self.directory, self.worker)
        joint = {**self.first_row, **joint}
        if self.reuse and self.order[0] not in joint:  # no fresh bootstrap to take it from
            spec = new_spec(self.cfg, self.held_out.train[self.order[0]])
            joint.update(joint_rows(self.cfg, spec, self.held_out, self.order[:1]))
        return {b: joint[b] for b in self.order if b in joint}, naive


def _add_references(
    timeline: list[TimelineRow],
    joint: dict[str, dict[str, float]],
    naive: dict[str, dict[str, float]],
) -> References:
    """Joint and naive accuracy on the new batch and on retention, beside each champion row;
    returns both references' accuracy rows (batch → row after learning it)."""
    for row in timeline:
        batch = row.batch_ids[-1] if row.batch_ids else None
        if batch is None or batch not in joint:
            continue
        row.joint_new_accuracy = joint[batch].get(batch)
        row.joint_retention_accuracy = retention_accuracy(joint[batch], batch)
        if batch in naive:
            row.baseline_retention_accuracy = retention_accuracy(naive[batch], batch)
    return joint, naive


def _bootstrap_state(cfg: EvergreenConfig) -> ModelState:
    """The first registered version (the naive reference's start when no fresh bootstrap ran)."""
    from model_registry.registry import Registry
    from tasks.version_cache import load_cached

    registry = Registry.from_config(cfg)
    first = registry.history(limit=1000)[-1].version
    return load_cached(cfg, registry, first)


LEARNING_FLOWS = frozenset({"bootstrap", "daily-lora", "weekly-replay", "monthly-finetune"})


def _verdict(timeline: list[TimelineRow]) -> str:
    """The demo's quality targets, measured: new-batch accuracy vs joint, retention ≥ 0.90.

    The gap is taken after every flow that learns batches (a rejected update counts: the champion
    it leaves is what serves). The stream monitor only watches: the weekly update the same day
    learns the batches of its window, and joint training has already learned them."""
    gaps = [
        r.joint_new_accuracy - r.new_accuracy
        for r in timeline
        if r.flow in LEARNING_FLOWS
        and r.new_accuracy is not None
        and r.joint_new_accuracy is not None
    ]
    kept = [r.retention_accuracy for r in timeline if r.retention_accuracy is not None]
    if not gaps or not kept:
        return "no updates to compare"
    return (
        f"champion vs joint on each new batch: largest gap {max(gaps) * 100:+.1f} pts "
        f"(mean {np.mean(gaps) * 100:+.1f}); lowest retention accuracy {min(kept):.3f}"
    )


def _run_calendar(
    cfg: EvergreenConfig,
    config_path: Path,
    plan: list[tuple[str, str, dict[str, Any]]],
    held_out: HeldOut,
    console: Console,
    after_flow: Callable[[str, dict[str, Any], ModelState], None] | None = None,
) -> tuple[list[TimelineRow], list[tuple[str, dict[str, float]]]]:
    timeline: list[TimelineRow] = []
    matrix_rows: list[tuple[str, dict[str, float]]] = []
    for date, flow_name, extra in plan:
        params = {"config_path": str(config_path), **extra}
        if extra.get("versions") == "champion+previous":
            params["versions"] = _champion_and_previous(cfg)
        console.print(f"[bold cyan]{date}[/bold cyan] {flow_name} {extra or ''}")
        result = run_flow(flow_name, **params)
        champion = load_champion.fn(cfg)
        if champion is None:  # the demo bootstraps first; a failed bootstrap raised already
            raise RuntimeError(f"no champion after {flow_name} on {date}")
        if after_flow is not None:
            after_flow(flow_name, result, champion)
        until = max([b for b in result.get("batch_ids") or [date]] + [date])
        row = accuracy_row(cfg, champion.model, held_out, until, champion.spec)
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
                forgetting=history_forgetting([r for _, r in matrix_rows]),
                note="; ".join(result.get("reasons", []))[:600],
            )
        )
    return timeline, matrix_rows


def _champion_and_previous(cfg: EvergreenConfig) -> list[str]:
    """The previous and the current champion (the same version twice if there is only one)."""
    versions = lineage_versions(cfg, 2)
    return versions if len(versions) == 2 else versions * 2


def _write(
    cfg: EvergreenConfig,
    scenario: Scenario,
    timeline: list[TimelineRow],
    matrix_rows: list[tuple[str, dict[str, float]]],
    held_out: HeldOut,
    final: FinalComparison,
    seconds: float,
) -> Path:
    columns = list(held_out.gate)
    matrix = np.full((len(matrix_rows), len(columns)), np.nan)
    for i, (_, row) in enumerate(matrix_rows):
        for j, batch_id in enumerate(columns):
            matrix[i, j] = row.get(batch_id, np.nan)
    labels = ([name for name, _ in matrix_rows], columns)
    return write_report(
        cfg.home_path / "reports" / scenario.report_dir,
        timeline=timeline,
        accuracy_matrix=matrix,
        matrix_labels=labels,
        title=scenario.title,
        extra_markdown=comparison_markdown(final, seconds=seconds),
    )


def _batches_table(batches: list[DemoBatch], title: str) -> Table:
    table = Table(title=title)
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
        "  Both UIs:    evergreen ui   (prints these commands for this home; --start runs them)\n"
        f"  Status:      evergreen status --config {config_path}\n"
        "               (from this folder plain `evergreen status`: `evergreen demo` leaves a\n"
        "               pointer in .evergreen/current-config)\n"
        f"  Rollback:    evergreen rollback --config {config_path}\n"
        f"  Serve:       mlflow models serve -m models:/{cfg.registry.name}@champion "
        f"(MLFLOW_TRACKING_URI={cfg.tracking_uri})"
    )
