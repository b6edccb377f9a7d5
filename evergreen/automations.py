"""Prefect automations an operator wants on day one: tell someone when a run fails or a batch is
quarantined.

A notification needs a notification block (Slack, e-mail, …) that only the operator can create, so
`prefect.yaml` cannot hold these; `evergreen deploy --notify BLOCK_SLUG` creates them (once, never
overwriting one an operator edited in the UI), pointed at that block. The drift trigger's cooldown
is in `prefect.yaml` itself (`evergreen.deployments.DRIFT_COOLDOWN_SECONDS`).
"""

from __future__ import annotations

from typing import Any, cast
from uuid import UUID

FAILED_RUN = "evergreen: flow run failed"
QUARANTINED = "evergreen: batch quarantined"


def automation_specs(block_document_id: UUID | str) -> list[dict[str, Any]]:
    """The automations as Prefect's API takes them (validated by `AutomationCore` in a test)."""
    notify = {"type": "send-notification", "block_document_id": str(block_document_id)}
    return [
        {
            "name": FAILED_RUN,
            "description": "A flow run of an evergreen deployment failed or crashed.",
            "enabled": True,
            "trigger": {
                "type": "event",
                "posture": "Reactive",
                "match": {"prefect.resource.id": "prefect.flow-run.*"},
                "match_related": {"prefect.resource.id": "prefect.tag.evergreen"},
                "expect": ["prefect.flow-run.Failed", "prefect.flow-run.Crashed"],
                "threshold": 1,
                "within": 0,
            },
            "actions": [
                {
                    **notify,
                    "subject": "evergreen: {{ flow_run.name }} {{ flow_run.state.name }}",
                    "body": "Flow run {{ flow_run.name }} ({{ flow.name }}) ended "
                    "{{ flow_run.state.name }}: {{ flow_run.state.message }}\n"
                    "{{ flow_run|ui_url }}",
                }
            ],
        },
        {
            "name": QUARANTINED,
            "description": "Validation quarantined a landing-zone batch (files kept, champion "
            "unchanged); someone has to fix the export.",
            "enabled": True,
            "trigger": {
                "type": "event",
                "posture": "Reactive",
                "match": {"prefect.resource.id": "evergreen.model.*"},
                "expect": ["evergreen.batch.quarantined"],
                "threshold": 1,
                "within": 0,
            },
            "actions": [
                {
                    **notify,
                    "subject": "evergreen: batch quarantined ({{ event.resource.name }})",
                    "body": "{{ event.event }} on {{ event.resource.id }}: "
                    "{{ event.payload | tojson }}",
                }
            ],
        },
    ]


def ensure_automations(block_slug: str) -> list[str]:
    """Create the automations that do not exist yet (by name); the names created."""
    from prefect.automations import Automation, AutomationCore
    from prefect.blocks.core import Block

    # sync-compatible: called from sync code it returns the block, not a coroutine
    block = cast(Block, Block.load(block_slug))
    block_id = block._block_document_id
    if block_id is None:  # a loaded block always has its document id
        raise ValueError(f"block {block_slug!r} has no document id")
    existing = {automation.name for automation in _read_all()}
    created = []
    for spec in automation_specs(block_id):
        if spec["name"] in existing:
            continue
        Automation(**AutomationCore.model_validate(spec).model_dump()).create()
        created.append(spec["name"])
    return created


def _read_all() -> list[Any]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return list(client.read_automations())
