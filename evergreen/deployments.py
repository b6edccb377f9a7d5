"""`prefect.yaml`, rendered from the cadence declaration (`evergreen.cadences`).

The checked-in `prefect.yaml` is this module's output (`python -m evergreen.deployments >
prefect.yaml`); a unit test fails when the two differ, so the deployment file cannot drift from
the flows. Edit `CADENCES`, not the YAML.
"""

from __future__ import annotations

from typing import Any

import yaml

from evergreen.cadences import CADENCES, Cadence

WORK_POOL = "evergreen-process"
# Flows started without `config_path` read their config from this Prefect Variable (a path, the
# YAML text, or a JSON object), so it is editable in the UI: `flows.common.begin`.
CONFIG_VARIABLE = "evergreen_config"
# A burst of drift events starts one update, then nothing for this long (reactive `within`).
DRIFT_COOLDOWN_SECONDS = 3600
# Our libraries' loggers are forwarded to the flow run's logs (the Prefect UI).
JOB_ENV = {"PREFECT_LOGGING_EXTRA_LOGGERS": "data_plane,model_registry,continual"}
HEADER = """\
# evergreen deployments: one per row of the decision table, rendered from evergreen/cadences.py
# by `python -m evergreen.deployments > prefect.yaml` (do not edit by hand: a test compares).
# Register them with `evergreen deploy` (creates the work pool and concurrency limits, then runs
# `prefect deploy --all` on this file). Workers run the flows from the directory that holds
# evergreen.yaml (EVERGREEN_WORKDIR, set by `evergreen deploy` to the current directory).
"""


def _defaults(item: Cadence) -> dict[str, Any]:
    """The parameter form's defaults (required fields are left for the person running it)."""
    defaults = {}
    for name, info in item.params_model().model_fields.items():
        if info.is_required():
            continue
        value = info.get_default(call_default_factory=True)
        if value is not None:
            defaults[name] = value
    return defaults


def _deployment(item: Cadence) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": item.name,
        "entrypoint": item.entrypoint,
        "description": item.description,
        "tags": ["evergreen", *item.tags],
        "parameters": _defaults(item),
        "enforce_parameter_schema": True,
    }
    if item.manual:
        spec["concurrency_limit"] = 1
    else:
        spec["concurrency_limit"] = {"limit": 1, "collision_strategy": item.collision}
        schedule = {"cron": item.schedule} if item.schedule else {"interval": item.interval_seconds}
        spec["schedules"] = [{**schedule, "timezone": "UTC"}]
    if item.triggers:
        spec["triggers"] = [
            {
                "type": "event",
                "enabled": True,
                "match": {"prefect.resource.id": "evergreen.model.*"},
                "expect": list(item.triggers),
                "posture": "Reactive",
                "threshold": 1,
                "within": DRIFT_COOLDOWN_SECONDS,
            }
        ]
    spec["work_pool"] = {
        "name": WORK_POOL,
        "work_queue_name": "default",
        "job_variables": {"env": dict(JOB_ENV)},
    }
    return spec


def render() -> str:
    """The whole prefect.yaml text."""
    document = {
        "name": "evergreen",
        "prefect-version": "3.8.8",
        "build": None,
        "push": None,
        "pull": [
            {
                "prefect.deployments.steps.set_working_directory": {
                    "directory": "{{ $EVERGREEN_WORKDIR }}"
                }
            }
        ],
        "deployments": [_deployment(item) for item in CADENCES],
    }
    body = yaml.safe_dump(document, sort_keys=False, width=100, allow_unicode=True)
    return HEADER + "\n" + body


if __name__ == "__main__":
    print(render(), end="")
