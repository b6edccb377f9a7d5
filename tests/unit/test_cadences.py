"""The decision table is declared once: flows, CLI, prefect.yaml and bootstrap derive from it."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from prefect import Flow, flow, get_run_logger, task
from pydantic import BaseModel

import flows
from evergreen import cadences, deployments
from evergreen.cadences import BY_NAME, CADENCES, batch_consumers, by_section, cadence
from evergreen.cli import build_parser

PREFECT_YAML = Path(__file__).resolve().parents[2] / "prefect.yaml"


def _flows_in_package() -> dict[str, str]:
    """Every Prefect flow defined in flows/ → its entrypoint."""
    found = {}
    for module in pkgutil.iter_modules(flows.__path__):
        imported = importlib.import_module(f"flows.{module.name}")
        for attribute, value in vars(imported).items():
            if isinstance(value, Flow) and value.__module__ == imported.__name__:
                found[value.name] = f"{imported.__name__}:{attribute}"
    return found


def test_every_flow_is_declared_and_every_declaration_is_a_flow():
    assert _flows_in_package() == {c.name: c.entrypoint for c in CADENCES}


@pytest.mark.parametrize("item", CADENCES, ids=lambda c: c.name)
def test_declared_flow_and_params_load(item):
    assert item.flow().name == item.name
    assert item.params_model().model_json_schema()["type"] == "object"


def test_prefect_yaml_is_the_rendered_declaration():
    assert PREFECT_YAML.read_text() == deployments.render(), (
        "prefect.yaml is out of date: run `python -m evergreen.deployments > prefect.yaml`"
    )


def test_cli_run_offers_exactly_the_declared_flows():
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    flow_argument = next(a for a in run._actions if a.dest == "flow")
    assert list(flow_argument.choices) == [c.name for c in CADENCES]


def test_bootstrap_counts_for_the_cadences_that_consume_batches():
    assert set(batch_consumers()) == {
        "monthly-finetune",
        "weekly-replay",
        "daily-lora",
        "stream-monitor",
    }
    assert by_section("weekly") is BY_NAME["weekly-replay"]
    with pytest.raises(KeyError, match="choose one of"):
        cadence("hourly")


@task
def _logging_step(rows: list[float]) -> float:
    get_run_logger().info("step over %d rows", len(rows))
    return sum(rows)


@flow
def _tiny_flow(n: int) -> float:
    return _logging_step([1.0] * n)


def test_run_flow_in_a_loop_does_not_pile_up_prefect_shutdown_calls(monkeypatch):
    """Issue 13: run_flow used to drain Prefect's services after every run. Each restart of a
    service appends a shutdown call, holding a copy of a task run's context (its parameters and
    staged results), to Prefect's global loop for the life of the process: ≈ 4 MB a daily-lora
    run in a long-lived process. Several runs in one process must leave that list as it was."""
    from prefect._internal.concurrency import threads

    class _Params(BaseModel):
        n: int

    tiny = SimpleNamespace(flow=lambda: _tiny_flow, params_model=lambda: _Params)
    monkeypatch.setattr(cadences, "cadence", lambda name: tiny)
    sizes = []
    for _ in range(4):
        assert cadences.run_flow("tiny", n=1000) == 1000.0
        sizes.append(len(threads.get_global_loop()._on_shutdown))
    assert sizes[1:] == [sizes[1]] * 3, sizes
