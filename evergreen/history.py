"""`evergreen report`: a Markdown + PNG report from what the registry and ledger recorded."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from evergreen.config import EvergreenConfig
from evergreen.report import TimelineRow, write_report
from model_registry.ledger import Ledger
from model_registry.registry import Registry

_GATE_KEYS = {  # (new data, retention) accuracy of each side of the gate, as the version records it
    "challenger": ("gate.challenger_new_accuracy", "gate.challenger_retention_accuracy"),
    "champion": ("gate.new.champion_mean", "gate.retention.champion_mean"),
}


def _metric(version_tags: dict[str, str], key: str) -> float | None:
    try:
        return float(json.loads(version_tags.get("evergreen.gate_metrics", "{}"))[key])
    except (KeyError, ValueError, TypeError):
        return None


def timeline_from_registry(cfg: EvergreenConfig) -> list[TimelineRow]:
    """One row per recorded flow outcome (ledger), oldest first, with the gate's numbers.

    Each row shows the champion *after* the run and its accuracies: a rejected run's row keeps
    the champion it was compared with (the gate's champion-side numbers), not the challenger's.
    The ledger has one entry per batch and cadence: the entries one run wrote for its batches
    are one row (`merge_run_rows`), and the entries bootstrap writes for the other cadences
    (its batches are not new to them) are not runs of those cadences and are left out.
    """
    registry = Registry.from_config(cfg)
    versions = {v.version: v for v in registry.versions(limit=500)}
    rows: list[TimelineRow] = []
    champion: str | None = None
    for entry in reversed(Ledger.from_config(cfg).entries(limit=1000)):
        if entry.details.get("by") == "bootstrap":  # tasks.ledger.record_consumed
            continue
        version = entry.details.get("version")
        promoted = entry.outcome == "promoted"
        # entries from before the ledger recorded the champion: a promotion's version is it
        champion = entry.details.get("champion") or (version if promoted else champion)
        tags = versions[version].tags if version in versions else {}
        side = "challenger" if promoted else "champion"
        rows.append(
            TimelineRow(
                date=entry.at[:19],
                flow=entry.cadence,
                batch_ids=[entry.batch_id],
                decision=entry.outcome,
                champion_version=champion,
                new_accuracy=_metric(tags, _GATE_KEYS[side][0]),
                retention_accuracy=_metric(tags, _GATE_KEYS[side][1]),
                forgetting=None,
                note=entry.details.get("reasons", entry.details.get("reason", ""))[:160],
            )
        )
    return merge_run_rows(rows)


def merge_run_rows(rows: list[TimelineRow]) -> list[TimelineRow]:
    """Consecutive rows of one run (same cadence, decision, champion, numbers and reasons: the
    ledger entries a run writes for each of its batches) as one row with every batch. A
    quarantine's reason names its batch, so each quarantined batch keeps its own row."""
    merged: list[TimelineRow] = []
    for row in rows:
        last = merged[-1] if merged else None
        same_run = (
            last is not None
            and row.decision != "quarantined"
            and (
                (last.flow, last.decision, last.champion_version, last.note)
                == (row.flow, row.decision, row.champion_version, row.note)
                and (last.new_accuracy, last.retention_accuracy)
                == (row.new_accuracy, row.retention_accuracy)
                and last.date[:16] == row.date[:16]
            )
        )
        if last is not None and same_run:
            merged[-1] = replace(last, batch_ids=[*last.batch_ids, *row.batch_ids])
        else:
            merged.append(row)
    return merged


def write_registry_report(cfg: EvergreenConfig, out: Path) -> Path:
    champion = Registry.from_config(cfg).champion()
    extra = f"\nChampion: v{champion.version}\n" if champion else "\nNo champion yet.\n"
    return write_report(
        out,
        timeline=timeline_from_registry(cfg),
        title=f"evergreen report: {cfg.registry.name}",
        extra_markdown=extra,
        champion=champion.version if champion else None,
    )
