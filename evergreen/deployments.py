"""`prefect.yaml`, rendered from the cadence declaration (`evergreen.cadences`).

The checked-in `prefect.yaml` is this module's output (`python -m evergreen.deployments >
prefect.yaml`); a unit test fails when the two differ, so the deployment file cannot drift from
the flows. Edit `CADENCES`, not the YAML.

`python -m evergreen.deployments --production > infra/prefect.production.yaml` renders the
production variant: the cadences that train (their config section has `train`) go to the
Kubernetes GPU pool (`infra/work-pools/kubernetes-gpu.json`) with one GPU and one torchrun
process per pod by default (`gpu_count`, `train_processes`: raise both together for DDP on N GPUs);
the others stay on the process pool.
"""

from __future__ import annotations

from typing import Any

import yaml

from evergreen.cadences import CADENCES, Cadence

WORK_POOL = "evergreen-process"
GPU_WORK_POOL = "evergreen-gpu"
GPU_JOB_VARIABLES = {"gpu_count": 1, "train_processes": "1"}
PRODUCTION_HEADER = """\
# evergreen production deployments, rendered by
# `python -m evergreen.deployments --production > infra/prefect.production.yaml` (a test compares).
# The training cadences run as Kubernetes jobs on the `evergreen-gpu` pool
# (infra/work-pools/kubernetes-gpu.json); `train_processes` is the torchrun process count (the
# default of every `<section>.train.processes` left unset), normally equal to `gpu_count`.
# Register with `prefect deploy --all --prefect-file infra/prefect.production.yaml` from /app.
"""
# Flows started without `config_path` read their config from this Prefect Variable (a path, the
# YAML text, or a JSON object), so it is editable in the UI: `flows.common.begin`.
CONFIG_VARIABLE = "evergreen_config"
# A burst of drift events starts one update, then nothing for this long (reactive `within`).
DRIFT_COOLDOWN_SECONDS = 3600
# The run a drift event starts is told why: Prefect renders this Jinja template with the
# triggering event (server side, when the automation fires) into the flow's `trigger` parameter
# (flows.params.TRIGGER). A plain string with text around the expressions stays a string, so the
# typed `str` field of the run form holds it; it is JSON, parsed back by `flows.common`.
TRIGGER_TEMPLATE = (
    '{"event": {{ event.event | tojson }}, "id": "{{ event.id }}", '
    '"occurred": "{{ event.occurred }}", "model": {{ event.resource.name | tojson }}, '
    '"details": {{ event.payload | tojson }} }'
)
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


def trains(item: Cadence) -> bool:
    """Whether the cadence trains a model (its config section has a `train` block)."""
    from evergreen.config import EvergreenConfig

    if item.section is None:
        return False
    section = EvergreenConfig.model_fields[item.section].annotation
    return "train" in getattr(section, "model_fields", {})


def _work_pool(item: Cadence, production: bool) -> dict[str, Any]:
    if production and trains(item):
        return {
            "name": GPU_WORK_POOL,
            "work_queue_name": "default",
            "job_variables": dict(GPU_JOB_VARIABLES),
        }
    # The GPU pool's template already sets JOB_ENV in its `env` default (a job variable `env`
    # would replace that whole default, EVERGREEN_HOME and MLFLOW_TRACKING_URI included).
    return {
        "name": WORK_POOL,
        "work_queue_name": "default",
        "job_variables": {"env": dict(JOB_ENV)},
    }


def _deployment(item: Cadence, production: bool = False) -> dict[str, Any]:
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
                "parameters": {"trigger": TRIGGER_TEMPLATE},
            }
        ]
    spec["work_pool"] = _work_pool(item, production)
    return spec


def render(production: bool = False) -> str:
    """The whole prefect.yaml text (`production`: infra/prefect.production.yaml's)."""
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
        "deployments": [_deployment(item, production) for item in CADENCES],
    }
    body = yaml.safe_dump(document, sort_keys=False, width=100, allow_unicode=True)
    return (PRODUCTION_HEADER if production else HEADER) + "\n" + body


if __name__ == "__main__":
    import sys

    print(render(production="--production" in sys.argv[1:]), end="")
