"""What `evergreen status` shows: plain data (`--json`) and rich tables for people.

`status_snapshot` gathers everything into JSON-able dicts once; the renderers only format, so
the JSON and the tables always agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from model_registry.ledger import REASONS_SEPARATOR, Ledger
from model_registry.registry import UNGATED, Registry
from model_registry.versions import VersionInfo

# Version tags worth a column (prefix "evergreen." is implied); the rest stays in the JSON.
VERSION_COLUMNS = ("cadence", "method", "parent_version", "batch_ids", "gate_decision", "decision")
WHY_MIN_WIDTH = 110  # the ledger's fixed columns take ~80; below this the "why" column is left out
_SHORT_HEADERS = {"parent_version": "parent", "batch_ids": "batches", "gate_decision": "gate"}


def status_snapshot(
    registry: Registry,
    ledger: Ledger,
    *,
    versions: int = 20,
    history: int = 20,
    ledger_entries: int = 50,
) -> dict[str, Any]:
    """Champion, aliases, recent versions with their decisions, promotion history, ledger.

    Args:
        registry: the pipeline's registry.
        ledger: the batch ledger.
        versions, history, ledger_entries: how many of each to include (newest first).

    Returns:
        A JSON-able dict: model, tracking_uri, champion, challenger, aliases, versions,
        history, ledger.
    """
    champion = registry.champion()
    challenger = registry.challenger()
    return {
        "model": registry.model_name,
        "tracking_uri": registry.tracking_uri,
        "champion": _version(champion) if champion else None,
        "challenger": _version(challenger) if challenger else None,
        "aliases": registry.aliases(),
        "versions": [_version(v) for v in registry.versions(limit=versions)],
        "history": [dataclasses.asdict(e) for e in registry.history(limit=history)],
        "ledger": [dataclasses.asdict(e) for e in ledger.entries(limit=ledger_entries)],
    }


def _version(info: VersionInfo) -> dict[str, Any]:
    data = dataclasses.asdict(info)
    data["created"] = _ms_to_iso(info.created_ms)
    data["lineage"] = {
        k.removeprefix("evergreen."): v
        for k, v in info.tags.items()
        if k.startswith("evergreen.") and not k.startswith("evergreen.sha256.")
    }
    return data


def _ms_to_iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="seconds")


def render_status(snapshot: Mapping[str, Any], console: Console) -> None:
    """Print a snapshot as a summary line and tables (versions, history, ledger)."""
    champion = snapshot.get("champion")
    summary = f"[bold]{snapshot['model']}[/] @ {snapshot['tracking_uri']}\n"
    if champion:
        lineage = champion["lineage"]
        parent = lineage.get("parent_version", "none")
        summary += (
            f"champion: [green]v{champion['version']}[/] "
            f"({lineage.get('cadence', '?')}/{lineage.get('method', '?')}, "
            f"parent {'none' if parent == 'none' else 'v' + parent})"
        )
    else:
        summary += "champion: [yellow]none[/] (run the bootstrap flow first)"
    aliases = ", ".join(f"{a} → v{v}" for a, v in sorted(snapshot["aliases"].items()))
    console.print(summary + (f"\naliases: {aliases}" if aliases else ""))
    console.print(_versions_table(snapshot["versions"]))
    render_history(snapshot["history"], console)
    console.print(_ledger_table(snapshot["ledger"], why=console.width >= WHY_MIN_WIDTH))


def _versions_table(versions: Iterable[Mapping[str, Any]]) -> Table:
    table = Table(title="Model versions (newest first)")
    for column in ("version", "created", "aliases", *VERSION_COLUMNS):
        table.add_column(_SHORT_HEADERS.get(column, column), overflow="fold")
    for v in versions:
        lineage = v["lineage"]
        cells = [lineage.get(c, "") for c in VERSION_COLUMNS]
        cells[VERSION_COLUMNS.index("batch_ids")] = lineage.get("batch_ids", "").replace(",", ", ")
        created = v["created"][:16].replace("T", " ")
        table.add_row(f"v{v['version']}", created, ", ".join(v["aliases"]), *cells)
    return table


def render_history(events: Iterable[Any], console: Console) -> None:
    """Print promotion events (PromotionEvent objects or their dicts), newest first."""
    table = Table(title="Promotion history (newest first)")
    for column in ("at", "action", "version", "replaced", "actor", "reason"):
        table.add_column(column, overflow="fold", min_width=20 if column == "reason" else None)
    for event in events:
        is_record = dataclasses.is_dataclass(event) and not isinstance(event, type)
        e = dataclasses.asdict(event) if is_record else dict(event)
        previous = f"v{e['previous']}" if e.get("previous") else "—"
        version = f"v{e['version']}" if e.get("version") else "—"  # "—": alias removed by hand
        action = f"[red]{e['action']}[/]" if e["reason"].startswith(UNGATED) else e["action"]
        at = e["at"][:16].replace("T", " ")
        table.add_row(at, action, version, previous, e["actor"], e["reason"])
    console.print(table)


def _ledger_table(entries: Iterable[Mapping[str, Any]], *, why: bool = True) -> Table:
    """The ledger, newest first; `why` adds the deciding sentence (it needs a wide console: the
    other columns never wrap)."""
    hint = "every reason:" if why else "why: a wider console, or"
    table = Table(title=f"Batch ledger (newest first; {hint} evergreen status --json)")
    for column in ("at", "cadence", "batch", "outcome", "version"):
        table.add_column(column, no_wrap=True)
    if why:
        table.add_column("why", overflow="fold", min_width=20)
    colours = {"promoted": "green", "rejected": "yellow", "quarantined": "red", "failed": "red"}
    for e in entries:
        colour = colours.get(e["outcome"], "white")
        outcome = f"[{colour}]{e['outcome']}[/]"
        at = e["at"][:16].replace("T", " ")
        version = e["details"].get("version") or e["details"].get("by") or "—"
        version = "—" if version == "None" else version  # how earlier releases wrote "none"
        cells = [at, e["cadence"], e["batch_id"], outcome, version]
        if why:
            cells.append(ledger_why(e))
        table.add_row(*cells)
    return table


def ledger_why(entry: Mapping[str, Any]) -> str:
    """The sentence that decided a batch that was not promoted ("" for a promotion).

    Why: an operator reading `evergreen status` at 3 a.m. needs the cause beside "rejected",
    not in the JSON: the gate's blocking checks (their sentences end in "rejected.", after a
    heading such as "the update was discarded on its select rows …:"), the quarantine's first
    failed expectation, the error, or why a run skipped. Every reason stays in `--json`.
    """
    details = entry.get("details") or {}
    outcome = entry.get("outcome")
    reasons = [
        r.strip() for r in str(details.get("reasons", "")).split(REASONS_SEPARATOR) if r.strip()
    ]
    if outcome == "rejected":
        heading = reasons[:1] if reasons and reasons[0].endswith(":") else []
        blocking = [r for r in reasons if r.endswith("rejected.")]
        return " ".join(heading + blocking) if blocking else " ".join(reasons[:1])
    if outcome == "skipped":
        return " ".join(reasons)
    if outcome == "quarantined":
        return str(details.get("reason", "")).split(" — ", 1)[-1]  # after "batch X: INVALID"
    if outcome == "failed":
        return str(details.get("error", "")).splitlines()[0] if details.get("error") else ""
    return ""
