"""prefect.yaml: one deployment per cadence, entrypoints that import, schedules as in DESIGN.md."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prefect.flows import load_flow_from_entrypoint

from evergreen.cadences import BY_NAME as FLOWS

PREFECT_YAML = Path(__file__).resolve().parents[2] / "prefect.yaml"
SCHEDULES = {
    "monthly-finetune": "0 2 1 * *",
    "weekly-replay": "0 3 * * 1",
    "daily-lora": "0 4 * * *",
    "consolidate": "0 5 * * 0",
}


@pytest.fixture(scope="module")
def deployments() -> dict[str, dict]:
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    return {d["name"]: d for d in spec["deployments"]}


def test_one_deployment_per_flow(deployments):
    assert set(deployments) == set(FLOWS)


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_entrypoint_loads_the_registered_flow(deployments, name):
    flow = load_flow_from_entrypoint(deployments[name]["entrypoint"])
    assert flow.name == name
    assert deployments[name]["enforce_parameter_schema"] is True
    assert deployments[name]["work_pool"]["name"] == "evergreen-process"


def test_cron_schedules_and_drift_trigger(deployments):
    for name, cron in SCHEDULES.items():
        (schedule,) = deployments[name]["schedules"]
        assert (schedule["cron"], schedule["timezone"]) == (cron, "UTC")
    (trigger,) = deployments["weekly-replay"]["triggers"]
    assert trigger["expect"] == ["evergreen.drift.detected"]
    assert trigger["match"]["prefect.resource.id"] == "evergreen.model.*"


PRODUCTION_YAML = PREFECT_YAML.parent / "infra" / "prefect.production.yaml"
TRAINING = {"bootstrap", "monthly-finetune", "weekly-replay", "daily-lora"}


@pytest.fixture(scope="module")
def production() -> dict[str, dict]:
    spec = yaml.safe_load(PRODUCTION_YAML.read_text())
    return {d["name"]: d for d in spec["deployments"]}


def test_production_variant_is_rendered_and_sends_training_to_the_gpu_pool(production):
    import json

    from prefect.utilities.schema_tools import validate

    from evergreen import deployments

    assert PRODUCTION_YAML.read_text() == deployments.render(production=True), (
        "regenerate: python -m evergreen.deployments --production > infra/prefect.production.yaml"
    )
    assert set(production) == set(FLOWS)
    pool = json.loads((PRODUCTION_YAML.parent / "work-pools" / "kubernetes-gpu.json").read_text())
    for name, spec in production.items():
        assert spec["work_pool"]["name"] == (
            "evergreen-gpu" if name in TRAINING else "evergreen-process"
        )
        if name in TRAINING:  # the job variables are the GPU pool's own, and valid
            variables = spec["work_pool"]["job_variables"]
            assert set(variables) <= set(pool["variables"]["properties"])
            validate(variables, pool["variables"], raise_on_error=True, ignore_required=True)


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_production_entrypoints_import(production, name):
    assert load_flow_from_entrypoint(production[name]["entrypoint"]).name == name
