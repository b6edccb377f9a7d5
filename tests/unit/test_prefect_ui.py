"""What an operator sees in the Prefect UI: documented run forms, the config Variable, our
libraries' logs in the flow run's logs, automations and the drift trigger's cooldown."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect.utilities.callables import parameter_schema

from evergreen.automations import automation_specs
from evergreen.cadences import BY_NAME, CADENCES
from evergreen.deployments import DRIFT_COOLDOWN_SECONDS, JOB_ENV
from flows import common
from flows.params import FlowParams

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {"data": {"features": ["a", "b"], "label": "y", "classes": [0, 1]}}


@pytest.mark.parametrize("item", CADENCES, ids=lambda c: c.name)
def test_every_run_form_field_is_flat_typed_documented_and_shows_its_default(item):
    """The "Custom run" form is the flow's generated parameter schema: one field per knob."""
    schema = parameter_schema(item.flow()).model_dump()
    model = item.params_model()
    fields = schema["properties"]
    assert set(fields) == set(model.model_fields)  # the signature and the model agree
    assert not schema["definitions"], "a nested object in the form"
    for name, field in fields.items():
        declared = model.model_fields[name]
        assert field.get("description") == declared.description, f"{item.name}.{name}"
        assert "type" in field or "anyOf" in field, f"{item.name}.{name} is untyped"
        if declared.is_required():
            assert name in schema["required"]
        else:
            assert field["default"] == declared.get_default(), f"{item.name}.{name}"
    assert next(iter(fields)) in {"batch_ids", "versions", "to", "config_path"}  # the knob first


def test_flow_parameters_are_validated_like_the_model():
    from flows.merge import merge

    with pytest.raises(Exception, match="versions"):
        merge(versions=["3"])  # merge needs two versions: refused before anything runs


def test_prefect_yaml_wires_cooldown_and_log_forwarding():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    (trigger,) = by_name["weekly-replay"]["triggers"]
    assert trigger["within"] == DRIFT_COOLDOWN_SECONDS >= 600
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    DeploymentEventTrigger.model_validate(trigger)  # what `prefect deploy` builds from it
    for deployment in spec["deployments"]:
        assert deployment["work_pool"]["job_variables"]["env"] == JOB_ENV


def test_library_loggers_reach_prefects_api_handler():
    """With the env the CLI and the deployments set, `data_plane` logs go to the flow run."""
    code = (
        "import os, logging\n"
        "from evergreen.cli import QUIET_DEFAULTS\n"
        "for k, v in QUIET_DEFAULTS.items(): os.environ.setdefault(k, v)\n"
        "from prefect.logging.configuration import setup_logging\n"
        "setup_logging()\n"
        "for name in ('data_plane', 'model_registry', 'data_plane.landing'):\n"
        "    logger = logging.getLogger(name)\n"
        "    handlers = [h for l in (logger, logger.parent) for h in l.handlers]\n"
        "    print(name, sorted({type(h).__name__ for h in handlers}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    lines = done.stdout.splitlines()
    assert any(line.startswith("data_plane ") and "APILogHandler" in line for line in lines)
    assert any(line.startswith("model_registry ") and "APILogHandler" in line for line in lines)


def test_automations_validate_against_prefects_schema():
    from prefect.automations import AutomationCore

    specs = automation_specs("00000000-0000-0000-0000-000000000001")
    automations = [AutomationCore.model_validate(spec) for spec in specs]
    expects = {event for a in automations for event in a.trigger.expect}
    assert {"prefect.flow-run.Failed", "evergreen.batch.quarantined"} <= expects
    assert all(a.actions[0].type == "send-notification" for a in automations)


@pytest.mark.parametrize("form", ["path", "yaml", "json"])
def test_config_from_the_prefect_variable(tmp_path, monkeypatch, form):
    path = tmp_path / "evergreen.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "home": str(tmp_path / "home")}))
    value = {"path": str(path), "yaml": path.read_text(), "json": yaml.safe_load(path.read_text())}
    monkeypatch.setattr(common, "_config_variable", lambda: value[form])
    cfg = common.run_config(FlowParams(overrides=["daily.lora_r=4"]))
    assert (cfg.data.label, cfg.daily.lora_r, cfg.home_path) == ("y", 4, tmp_path / "home")
    # an explicit config_path wins over the Variable
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**MINIMAL, "data": {**MINIMAL["data"], "label": "z"}}))
    assert common.run_config(FlowParams(config_path=str(other))).data.label == "z"


def _drift_event(payload: dict) -> object:
    from uuid import uuid4

    from prefect.server.events.schemas.events import ReceivedEvent
    from prefect.types._datetime import now

    return ReceivedEvent(
        occurred=now("UTC"),
        event="evergreen.drift.detected",
        resource={"prefect.resource.id": "evergreen.model.digits", "prefect.resource.name": "dig"},
        payload=payload,
        id=uuid4(),
    )


def test_drift_trigger_renders_the_event_into_the_typed_trigger_parameter():
    """What the server does when the drift automation fires: render the action's parameters
    with the event (same code path: RunDeployment's v1-template upgrade, then hydration)."""
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
    from prefect.server.events.actions import RunDeployment
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    weekly = next(d for d in spec["deployments"] if d["name"] == "weekly-replay")
    (trigger,) = weekly["triggers"]
    deployment_trigger = DeploymentEventTrigger.model_validate(trigger)
    deployment_trigger.set_deployment_id("00000000-0000-0000-0000-000000000002")
    (action,) = deployment_trigger.as_automation().actions
    parameters = dict(action.parameters)
    RunDeployment._upgrade_v1_templates(parameters)
    payload = {"source": "stream-monitor", "champion": "3", "batch_id": "b2", "alarms": 2}
    event = _drift_event(payload)
    context = HydrationContext(
        raise_on_error=True, render_jinja=True, jinja_context={"event": event}
    )
    rendered = hydrate(parameters, context)

    model = BY_NAME["weekly-replay"].params_model()
    params = model(**rendered)  # the run form's type: a string, accepted by the schema
    assert isinstance(params.trigger, str)
    details = common.trigger_details(params.trigger)
    assert details["event"] == "evergreen.drift.detected"
    assert details["id"] == str(event.id) and details["model"] == "dig"
    assert details["details"] == payload  # types kept: alarms is still an int


def test_every_triggered_cadence_accepts_the_trigger_parameter():
    for item in CADENCES:
        if item.triggers:
            assert "trigger" in item.params_model().model_fields, item.name
            assert "trigger" in parameter_schema(item.flow()).model_dump()["properties"]


def test_trigger_details_of_free_text_and_of_nothing():
    assert common.trigger_details(None) == {} == common.trigger_details("  ")
    assert common.trigger_details("re-run after the export fix") == {
        "note": "re-run after the export fix"
    }
    assert common.trigger_details("[1, 2]") == {"note": "[1, 2]"}
