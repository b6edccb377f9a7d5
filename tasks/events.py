"""Prefect events evergreen emits; prefect.yaml wires `evergreen.drift.detected` to an update."""

from __future__ import annotations

from typing import Any

from prefect.events import emit_event

from evergreen.config import EvergreenConfig

EVENTS = (
    "evergreen.model.promoted",
    "evergreen.model.rejected",
    "evergreen.model.rolled-back",
    "evergreen.drift.detected",
    "evergreen.batch.quarantined",
)


def emit(event: str, cfg: EvergreenConfig, payload: dict[str, Any]) -> None:
    """Emit one event about the pipeline's registered model (resource id `evergreen.model.<name>`)."""
    if event not in EVENTS:
        raise ValueError(f"unknown event {event!r}; expected one of {EVENTS}")
    emit_event(
        event=event,
        resource={
            "prefect.resource.id": f"evergreen.model.{cfg.registry.name}",
            "prefect.resource.name": cfg.registry.name,
        },
        payload={k: v if isinstance(v, (int, float, bool)) else str(v) for k, v in payload.items()},
    )
