"""Flows selected by name (the CLI's `evergreen run <flow>` and prefect.yaml entrypoints)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from flows.bootstrap import bootstrap
from flows.consolidate import consolidate
from flows.daily_lora import daily_lora
from flows.merge import MergeParams, merge
from flows.monthly_finetune import monthly_finetune
from flows.rollback import RollbackParams, rollback
from flows.stream_monitor import StreamParams, stream_monitor
from flows.weekly_replay import weekly_replay
from tasks.common import FlowParams


@dataclass(frozen=True)
class FlowEntry:
    flow: Callable[..., dict]
    params: type[BaseModel]


FLOWS: dict[str, FlowEntry] = {
    "bootstrap": FlowEntry(bootstrap, FlowParams),
    "monthly-finetune": FlowEntry(monthly_finetune, FlowParams),
    "weekly-replay": FlowEntry(weekly_replay, FlowParams),
    "daily-lora": FlowEntry(daily_lora, FlowParams),
    "stream-monitor": FlowEntry(stream_monitor, StreamParams),
    "merge": FlowEntry(merge, MergeParams),
    "consolidate": FlowEntry(consolidate, FlowParams),
    "rollback": FlowEntry(rollback, RollbackParams),
}


def run_flow(name: str, **params) -> dict:
    """Run a flow in this process (ephemeral Prefect, or the server PREFECT_API_URL names)."""
    if name not in FLOWS:
        raise KeyError(f"unknown flow {name!r}; choose one of {sorted(FLOWS)}")
    entry = FLOWS[name]
    return entry.flow(params=entry.params(**params))
