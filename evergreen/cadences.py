"""The decision table, declared once: every cadence's flow, parameters, schedule and config section.

The CLI (`evergreen run FLOW`), the deployment file (`prefect.yaml`, rendered from here by
`evergreen.deploy`), the bootstrap's list of cadences its batches count for, and the demo's
calendar all derive from `CADENCES`. Adding a cadence is one flow file plus one entry here (and
its config section); `tests/unit/test_cadences.py` fails if a flow exists that is not declared,
or the reverse.

Flows are referenced by entrypoint strings and imported on first use, so `evergreen status` or
`evergreen --help` do not pay for importing torch, peft, Great Expectations and MLflow.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import BaseModel

FLOW_PARAMS = "flows.params:FlowParams"


@dataclass(frozen=True)
class Cadence:
    """One row of the decision table.

    Attributes:
        name: flow, deployment and CLI name.
        entrypoint: "module:function" of the Prefect flow.
        description: one line for the CLI and the deployment.
        params: "module:Model" of the flow's parameter model (the Prefect UI form).
        section: the config section the cadence reads besides the shared ones (None: none).
        schedule: default cron (UTC), or None for a manual cadence.
        interval_seconds: default interval schedule instead of a cron.
        consumes_batches: it processes landing-zone batches (so the first champion's batches
            count as processed for it).
        triggers: events that start it (Prefect automations in the deployment).
        collision: what a run does when one is already running ("ENQUEUE" or "CANCEL_NEW").
        tags: deployment tags.
    """

    name: str
    entrypoint: str
    description: str
    params: str = FLOW_PARAMS
    section: str | None = None
    schedule: str | None = None
    interval_seconds: int | None = None
    consumes_batches: bool = False
    triggers: tuple[str, ...] = ()
    collision: str = "ENQUEUE"
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def manual(self) -> bool:
        return self.schedule is None and self.interval_seconds is None

    def flow(self) -> Callable[..., dict[str, Any]]:
        """The Prefect flow (imported now)."""
        return _load(self.entrypoint)  # type: ignore[no-any-return]

    def params_model(self) -> type[BaseModel]:
        """The flow's parameter model (imported now)."""
        return _load(self.params)  # type: ignore[no-any-return]


def _load(reference: str) -> Any:
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


CADENCES: tuple[Cadence, ...] = (
    Cadence(
        "bootstrap",
        "flows.bootstrap:bootstrap",
        "First run: plain training of the first champion (manual).",
        section="bootstrap",
        tags=("manual",),
    ),
    Cadence(
        "monthly-finetune",
        "flows.monthly_finetune:monthly_finetune",
        "Full fine-tune + online EWC on the month's batches.",
        section="monthly",
        schedule="0 2 1 * *",
        consumes_batches=True,
        tags=("monthly",),
    ),
    Cadence(
        "weekly-replay",
        "flows.weekly_replay:weekly_replay",
        "Experience replay from the data memory + EWC; also triggered by drift.",
        params="flows.params:TriggeredParams",
        section="weekly",
        schedule="0 3 * * 1",
        consumes_batches=True,
        triggers=("evergreen.drift.detected",),
        tags=("weekly",),
    ),
    Cadence(
        "daily-lora",
        "flows.daily_lora:daily_lora",
        "Online LoRA (peft) on the day's batches, kept only if it passes the gate's rule.",
        section="daily",
        schedule="0 4 * * *",
        consumes_batches=True,
        collision="CANCEL_NEW",
        tags=("daily",),
    ),
    Cadence(
        "stream-monitor",
        "flows.stream_monitor:stream_monitor",
        "Streaming EMA + Page-Hinkley drift detection over micro-batches.",
        params="flows.params:StreamParams",
        section="stream",
        interval_seconds=900,
        consumes_batches=True,
        collision="CANCEL_NEW",
        tags=("streaming",),
    ),
    Cadence(
        "merge",
        "flows.merge:merge",
        "On-demand merge of chosen versions: Fisher-weighted, linear, TIES or DARE (set `versions`).",
        params="flows.params:MergeParams",
        tags=("manual",),
    ),
    Cadence(
        "consolidate",
        "flows.consolidate:consolidate",
        "EMA / interpolation consolidation of the champion lineage.",
        params="flows.params:ConfigParams",
        section="consolidate",
        schedule="0 5 * * 0",
        tags=("periodic",),
    ),
    Cadence(
        "rollback",
        "flows.rollback:rollback",
        "Restore the previous (or a chosen) champion (manual).",
        params="flows.params:RollbackParams",
        tags=("manual",),
    ),
)

BY_NAME: dict[str, Cadence] = {c.name: c for c in CADENCES}


def cadence(name: str) -> Cadence:
    """The declared cadence `name`.

    Raises:
        KeyError: unknown name (the message lists the declared ones).
    """
    if name not in BY_NAME:
        raise KeyError(f"unknown flow {name!r}; choose one of {sorted(BY_NAME)}")
    return BY_NAME[name]


def batch_consumers() -> tuple[str, ...]:
    """Cadences that process landing-zone batches (bootstrap's batches count as done for them)."""
    return tuple(c.name for c in CADENCES if c.consumes_batches)


def by_section(section: str) -> Cadence:
    """The cadence that reads config section `section` (e.g. "weekly" → weekly-replay)."""
    for item in CADENCES:
        if item.section == section:
            return item
    raise KeyError(f"no cadence reads config section {section!r}")


LOG_FLUSH_SECONDS = 30.0


def run_flow(name: str, **params: Any) -> dict[str, Any]:
    """Run a declared flow in this process (ephemeral Prefect, or the server PREFECT_API_URL
    names) with `params` validated by its parameter model.

    Prefect's background services (log and event shipping) keep running between runs; a
    process that exits after its run (`evergreen run`) calls `flush_run_logs` before it does.
    """
    item = cadence(name)
    return item.flow()(**item.params_model()(**params).model_dump())


def flush_run_logs(timeout: float = LOG_FLUSH_SECONDS) -> None:
    """Send the queued log lines (and events) to the Prefect API now and wait for them.

    Prefect ships logs in the background and otherwise drains them at interpreter exit, racing
    the shutdown of `evergreen run`'s temporary server: on a busy machine a manual run's logs
    could miss the Prefect UI. Draining while the API still runs keeps them.

    Call it once, when the process is done with Prefect — not after every run of a long-lived
    process. Draining stops Prefect's services: every one of them, since `drain_all` of any
    service class walks the registry all service classes share (the events worker too). The next
    run starts them again, and each start appends a shutdown call to Prefect's global event loop
    that holds a copy of the context it started in — a task run's, with the task's parameters
    and staged results (data frames, the data memory) — until the process exits: ≈ 4 MB a
    daily-lora run when `run_flow` drained after every run (docs/SCALING.md, "Growth").
    """
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout, at_exit=False)
