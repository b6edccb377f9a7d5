"""prefect.yaml deployments on a real Prefect server with a real process worker.

`evergreen deploy` registers every deployment; `daily-lora` is triggered through the REST API
exactly as the UI's "Custom run" does (POST /deployments/{id}/create_flow_run with parameters);
the worker runs it and the MLflow champion alias moves, or stays with the reason recorded.
The same server holds what `evergreen deploy --notify` adds around the deployments: the config
Variable, the notification automations and the drift trigger (its cooldown, its parameters).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from benchmarks.screenshots import run_form
from evergreen.automations import FAILED_RUN, QUARANTINED
from evergreen.cadences import CADENCES
from evergreen.config import load_config
from evergreen.deployments import CONFIG_VARIABLE, DRIFT_COOLDOWN_SECONDS, TRIGGER_TEMPLATE
from model_registry.ledger import Ledger
from model_registry.registry import Registry
from tests.digits_pipeline import digits_frame, write_batch, write_config
from tests.integration.servers import (
    BIN,
    background,
    prefect_env,
    prefect_request,
    prefect_server,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
NOTIFY = "slack-webhook/evergreen-ops"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployed")
    landing = root / "landing"
    write_batch(landing, "2026-02-01", digits_frame(slice(0, 600)))
    write_batch(landing, "2026-02-02", digits_frame(slice(600, 800)))
    write_batch(landing, "2026-02-03", digits_frame(slice(800, 1200), shift=3))  # new writers
    config = write_config(root, landing, root / "home")
    with prefect_server(root / "prefect", backend="postgresql") as api:
        env = prefect_env(root / "prefect", api)
        _check(env, root, [str(BIN / "evergreen"), "run", "bootstrap", "--batch", "2026-02-01"])
        _check(env, root, [str(BIN / "python"), "-c", NOTIFICATION_BLOCK])
        _check(env, root, _deploy_command("--notify", NOTIFY))
        worker = [str(BIN / "prefect"), "worker", "start", "--pool", "evergreen-process"]
        with background(worker, env=env, log=root / "worker.log", cwd=root):
            yield {"api": api, "config": config, "root": root, "env": env}


# the block an operator would create in the UI (a Slack webhook; nothing is sent in these tests)
NOTIFICATION_BLOCK = (
    "from prefect.blocks.notifications import SlackWebhook\n"
    "SlackWebhook(url='http://127.0.0.1:9/hook').save('evergreen-ops')\n"
)


def _deploy_command(*extra: str) -> list[str]:
    return [str(BIN / "evergreen"), "deploy", "--prefect-file", str(ROOT / "prefect.yaml"), *extra]


def _check(env, cwd, command):
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def _deployment(api: str, name: str) -> dict:
    response = prefect_request("GET", f"{api}/deployments/name/{name}/{name}", timeout=30)
    response.raise_for_status()
    return response.json()


def _wait_final(api: str, run_id: str, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = prefect_request("GET", f"{api}/flow_runs/{run_id}", timeout=30).json()
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(3)
    raise TimeoutError(f"flow run {run_id} did not finish in {timeout}s")


def test_every_cadence_is_deployed_with_its_schedule(deployed):
    expected = {
        "monthly-finetune": "0 2 1 * *",
        "weekly-replay": "0 3 * * 1",
        "daily-lora": "0 4 * * *",
        "consolidate": "0 5 * * 0",
    }
    for name, cron in expected.items():
        deployment = _deployment(deployed["api"], name)
        assert deployment["enforce_parameter_schema"] is True
        assert deployment["schedules"][0]["schedule"]["cron"] == cron
        assert deployment["schedules"][0]["schedule"]["timezone"] == "UTC"
        assert deployment["work_pool_name"] == "evergreen-process"
    for name in ("bootstrap", "merge", "rollback", "stream-monitor"):
        assert _deployment(deployed["api"], name)["id"]


def test_scheduled_runs_have_the_expected_next_times(deployed):
    deployment = _deployment(deployed["api"], "daily-lora")
    deadline, runs = time.monotonic() + 120, []
    while time.monotonic() < deadline and not runs:
        runs = prefect_request(
            "POST",
            f"{deployed['api']}/flow_runs/filter",
            timeout=30,
            json={
                "deployments": {"id": {"any_": [deployment["id"]]}},
                "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                "sort": "EXPECTED_START_TIME_ASC",
                "limit": 5,
            },
        ).json()
        time.sleep(2)
    assert runs, "the scheduler created no runs for daily-lora"
    starts = [datetime.fromisoformat(r["expected_start_time"]).astimezone(UTC) for r in runs]
    assert all((s.hour, s.minute) == (4, 0) for s in starts), starts
    assert all((b - a).days == 1 for a, b in itertools.pairwise(starts)), starts
    assert starts[0] > datetime.now(UTC)


def test_custom_run_of_daily_lora_updates_or_keeps_the_champion(deployed):
    cfg = load_config(deployed["config"])
    registry = Registry.from_config(cfg)
    champion_before = registry.champion().version
    deployment = _deployment(deployed["api"], "daily-lora")
    response = prefect_request(
        "POST",
        f"{deployed['api']}/deployments/{deployment['id']}/create_flow_run",
        timeout=30,
        json={
            "parameters": {
                "config_path": "evergreen.yaml",
                "overrides": [],
                "batch_ids": ["2026-02-02"],
                "force": False,
            }
        },
    )
    assert response.status_code == 201, response.text
    run = _wait_final(deployed["api"], response.json()["id"])
    log = (deployed["root"] / "worker.log").read_text()[-4000:]
    assert run["state_type"] == "COMPLETED", log
    entry = Ledger.from_config(cfg).processed("daily-lora")["2026-02-02"]
    champion_after = registry.champion().version
    if entry.outcome == "promoted":
        assert champion_after != champion_before
    else:
        assert entry.outcome == "rejected" and entry.details["reasons"]
        assert champion_after == champion_before
    artifacts = prefect_request(
        "POST",
        f"{deployed['api']}/artifacts/filter",
        timeout=30,
        json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}},
    ).json()
    assert any(a["key"] == "daily-lora-decision" for a in artifacts), artifacts


def test_custom_run_forms_on_the_server_are_flat_typed_documented_with_defaults(deployed):
    """The "Custom run" form is rendered from what the server stores for the deployment
    (`parameter_openapi_schema`, prefilled with `parameters`): the page of
    docs/img/prefect-custom-run.png, read through the API the UI calls."""
    for item in CADENCES:
        form = run_form(deployed["api"], item.name)
        assert form.problems() == [], item.name
        model = item.params_model()
        assert set(form.fields) == set(model.model_fields), item.name
        for name, declared in model.model_fields.items():
            spec = form.fields[name]
            assert spec["description"] == declared.description, f"{item.name}.{name}"
            if not declared.is_required():
                assert spec["default"] == declared.get_default(), f"{item.name}.{name}"
        assert form.defaults == {
            name: spec["default"]
            for name, spec in form.fields.items()
            if spec.get("default") is not None
        }, f"{item.name}: the form is not prefilled with the visible defaults"
    daily = run_form(deployed["api"], "daily-lora").fields
    assert min(daily, key=lambda name: daily[name]["position"]) == "batch_ids"  # shown first
    assert daily["batch_ids"]["anyOf"][0] == {"items": {"type": "string"}, "type": "array"}
    assert daily["force"]["type"] == "boolean" and daily["force"]["default"] is False
    assert {"type": "integer"} in daily["max_batches"]["anyOf"]
    assert "trigger" in run_form(deployed["api"], "weekly-replay").fields


def test_invalid_parameters_are_refused_by_the_schema(deployed):
    deployment = _deployment(deployed["api"], "daily-lora")
    response = prefect_request(
        "POST",
        f"{deployed['api']}/deployments/{deployment['id']}/create_flow_run",
        timeout=30,
        json={"parameters": {"max_batches": "many"}},
    )
    assert response.status_code == 409, response.text


@contextmanager
def _client(api: str) -> Iterator:
    """Prefect's own (sync) client on the test server: read back what deploy created."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client


@pytest.fixture(scope="module")
def redeployed(deployed):
    """An operator edits the config Variable in the UI (the YAML itself instead of a path), then
    someone runs `evergreen deploy --notify` again."""
    from prefect.client.schemas.actions import VariableUpdate

    text = deployed["config"].read_text()
    with _client(deployed["api"]) as client:
        created = client.read_variable_by_name(CONFIG_VARIABLE)
        client.update_variable(VariableUpdate(name=CONFIG_VARIABLE, value=text))
    started = time.monotonic()
    names = ["--name", "weekly-replay", "--name", "stream-monitor"]
    _check(deployed["env"], deployed["root"], _deploy_command("--notify", NOTIFY, *names))
    return {**deployed, "created": created, "edited": text, "seconds": time.monotonic() - started}


def test_deploy_creates_the_config_variable_and_never_overwrites_it(redeployed):
    assert redeployed["created"].value == str(redeployed["config"].resolve())
    with _client(redeployed["api"]) as client:
        kept = client.read_variable_by_name(CONFIG_VARIABLE)
    assert kept.value == redeployed["edited"], "a second deploy replaced the operator's edit"


def _evergreen_automations(client) -> dict[str, list]:
    found: dict[str, list] = {}
    for automation in client.read_automations():
        found.setdefault(automation.name, []).append(automation)
    return found


def test_notification_automations_exist_once_and_notify_the_block(redeployed):
    from prefect.blocks.core import Block
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: redeployed["api"]}):
        block_id = Block.load(NOTIFY)._block_document_id
    with _client(redeployed["api"]) as client:
        found = _evergreen_automations(client)
    assert len(found[FAILED_RUN]) == 1 and len(found[QUARANTINED]) == 1, "deploy is not idempotent"
    (failed,), (quarantined,) = found[FAILED_RUN], found[QUARANTINED]
    assert failed.enabled and quarantined.enabled
    assert failed.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    assert failed.trigger.posture == "Reactive" and failed.trigger.threshold == 1
    related = failed.trigger.match_related
    related = related[0] if isinstance(related, list) else related
    assert related.model_dump() == {"prefect.resource.id": "prefect.tag.evergreen"}
    assert quarantined.trigger.expect == {"evergreen.batch.quarantined"}
    for automation in (failed, quarantined):
        (action,) = automation.actions
        assert (action.type, action.block_document_id) == ("send-notification", block_id)
        assert "{{" in action.subject and "{{" in action.body


def test_drift_trigger_is_one_automation_with_cooldown_and_event_parameters(redeployed):
    weekly = _deployment(redeployed["api"], "weekly-replay")
    with _client(redeployed["api"]) as client:
        owned = client.read_resource_related_automations(f"prefect.deployment.{weekly['id']}")
    assert len(owned) == 1, f"{len(owned)} drift automations after two deploys"
    (drift,) = owned
    assert drift.trigger.expect == {"evergreen.drift.detected"}
    assert drift.trigger.posture == "Reactive" and drift.trigger.threshold == 1
    assert drift.trigger.within.total_seconds() == DRIFT_COOLDOWN_SECONDS
    assert drift.trigger.match.model_dump() == {"prefect.resource.id": "evergreen.model.*"}
    (action,) = drift.actions
    assert action.type == "run-deployment" and str(action.deployment_id) == weekly["id"]
    assert action.parameters == {"trigger": TRIGGER_TEMPLATE}


def _runs_of(api: str, deployment_id: str) -> list[dict]:
    return prefect_request(
        "POST",
        f"{api}/flow_runs/filter",
        timeout=30,
        json={"deployments": {"id": {"any_": [deployment_id]}}, "limit": 20},
    ).json()


def _started_soon(run: dict) -> bool:
    """A run due now (an automation's), not one of the cron schedule's future runs."""
    expected = datetime.fromisoformat(run["expected_start_time"]).astimezone(UTC)
    return (expected - datetime.now(UTC)).total_seconds() < 300


def test_drift_event_triggers_the_update_deployment(deployed):
    api = deployed["api"]
    weekly = _deployment(api, "weekly-replay")
    before = {r["id"] for r in _runs_of(api, weekly["id"])}
    monitor = _deployment(api, "stream-monitor")
    response = prefect_request(
        "POST",
        f"{api}/deployments/{monitor['id']}/create_flow_run",
        timeout=30,
        json={"parameters": {"batch_ids": ["2026-02-03"]}},
    )
    assert response.status_code == 201, response.text
    run = _wait_final(api, response.json()["id"])
    assert run["state_type"] == "COMPLETED", (deployed["root"] / "worker.log").read_text()[-4000:]
    deadline, triggered, events = time.monotonic() + 180, [], []
    while time.monotonic() < deadline and not (triggered and events):
        events = prefect_request(
            "POST",
            f"{api}/events/filter",
            timeout=30,
            json={"filter": {"event": {"name": ["evergreen.drift.detected"]}}},
        ).json()["events"]
        runs = _runs_of(api, weekly["id"])
        triggered = [r for r in runs if r["id"] not in before and _started_soon(r)]
        time.sleep(3)
    assert events, "the monitor saw shifted digits but no drift event reached the server"
    assert triggered, "drift did not trigger a weekly-replay run"
    (run,) = triggered  # the monitor's validation and its stream may both report the drift
    # the triggered run was told which event started it, in its typed `trigger` parameter
    details = json.loads(run["parameters"]["trigger"])
    assert details["event"] == "evergreen.drift.detected"
    assert details["id"] in {e["id"] for e in events}
    assert details["details"]["batch_id"] == "2026-02-03"
    if details["details"]["source"] == "stream-monitor":
        champion = Registry.from_config(load_config(deployed["config"])).champion()
        assert details["details"]["champion"] == champion.version
    _another_drift_event_is_held_back_by_the_cooldown(api, weekly["id"], before, run)
    assert _logs_of(api, run["id"], "started by evergreen.drift.detected"), (
        "the triggered run did not record what started it"
    )


def _another_drift_event_is_held_back_by_the_cooldown(api, weekly_id, before, first) -> None:
    event_id = str(uuid.uuid4())
    event = {
        "id": event_id,
        "occurred": datetime.now(UTC).isoformat(),
        "event": "evergreen.drift.detected",
        "resource": {"prefect.resource.id": "evergreen.model.digits-test"},
        "payload": {"source": "test", "batch_id": "2026-02-03"},
    }
    assert prefect_request("POST", f"{api}/events", json=[event], timeout=30).status_code == 204
    deadline, seen = time.monotonic() + 60, []
    while time.monotonic() < deadline and not seen:
        seen = prefect_request(
            "POST", f"{api}/events/filter", timeout=30, json={"filter": {"id": {"id": [event_id]}}}
        ).json()["events"]
        time.sleep(1)
    assert seen, "the second drift event did not reach the server"
    time.sleep(8)  # the trigger reacts within a second or two of an event being stored
    runs = [r for r in _runs_of(api, weekly_id) if r["id"] not in before and _started_soon(r)]
    assert [r["id"] for r in runs] == [first["id"]], "the cooldown let a second update start"


def _logs_of(api: str, run_id: str, text: str, timeout: float = 240) -> list[str]:
    """Messages of the run's logs holding `text`, once the worker has started it."""
    deadline, found = time.monotonic() + timeout, []
    while time.monotonic() < deadline and not found:
        logs = prefect_request(
            "POST",
            f"{api}/logs/filter",
            timeout=30,
            json={"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200},
        ).json()
        found = [log["message"] for log in logs if text in log["message"]]
        time.sleep(3)
    return found
