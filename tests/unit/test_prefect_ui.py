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
from evergreen.cadences import CADENCES
from evergreen.deployments import DRIFT_COOLDOWN_SECONDS, JOB_ENV
from flows import common
from flows.params import FlowParams

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {"data": {"features": ["a", "b"], "label": "y", "classes": [0, 1]}}


def _form_fields(schema: dict) -> dict[str, dict]:
    """The fields the "Custom run" form shows (the flow's `params` model, resolved)."""
    (params,) = schema["properties"].values()
    name = params["$ref"].rsplit("/", 1)[-1] if "$ref" in params else params["allOf"][0]["$ref"]
    return schema["definitions"][name.rsplit("/", 1)[-1]]["properties"]


@pytest.mark.parametrize("item", CADENCES, ids=lambda c: c.name)
def test_every_run_form_field_is_typed_documented_and_shows_its_default(item):
    schema = parameter_schema(item.flow()).model_dump()
    fields = _form_fields(schema)
    model = item.params_model()
    assert set(fields) == set(model.model_fields)
    for name, field in fields.items():
        assert field.get("description"), f"{item.name}.{name} has no description"
        assert "type" in field or "anyOf" in field, f"{item.name}.{name} is untyped"
        if not model.model_fields[name].is_required():
            assert "default" in field, f"{item.name}.{name} hides its default"


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
