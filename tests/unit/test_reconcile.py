"""Bookkeeping in one experiment, and champion moves made by hand noticed by reconciliation."""

from __future__ import annotations

import threading
import time

import pytest
from mlflow import MlflowClient
from rich.console import Console

from model_registry.ledger import Ledger
from model_registry.locking import promotion_lock
from model_registry.promotion_history import PromotionEvent
from model_registry.reconcile import (
    ABANDONED,
    ABANDONED_AFTER_SECONDS,
    DECISION_TAG,
    Cleanup,
    clear_abandoned,
    reconcile_champion,
)
from model_registry.registry import Registry
from model_registry.run_log import RunLog, now_iso
from model_registry.status import render_history
from tests.checkpoints import tiny_checkpoint

FEATURES = ["f0", "f1"]
CLASSES = [0, 1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("reconcile")
    return {
        "root": root,
        "uri": f"sqlite:///{root}/mlflow.db",
        "artifacts": (root / "mlartifacts").as_uri(),
        "checkpoint": tiny_checkpoint(root / "ckpt", 0, FEATURES, CLASSES),
    }


def registry_for(store, name: str, experiment: str) -> Registry:
    return Registry(
        store["uri"],
        name,
        experiment=experiment,
        artifact_location=store["artifacts"],
        lock_dir=store["root"] / "locks",
    )


def test_ledger_and_history_share_one_experiment_and_read_legacy_records(store):
    registry = registry_for(store, "shared", "shared")
    ledger = Ledger(store["uri"], experiment="shared-records", legacy=("shared-ledger",))
    client = MlflowClient(store["uri"])
    # an entry an earlier release wrote into its own experiment (no record kind tag)
    RunLog(client, "shared-ledger", store["artifacts"]).append(
        {"evergreen.cadence": "daily", "evergreen.batch_id": "b0", "evergreen.outcome": "promoted"},
        run_name="old",
    )
    ledger.record("daily", "b1", "rejected")
    v1 = registry.log_version(store["checkpoint"], lineage={"gate_decision": "pass"}).version
    registry.promote(v1, expected_champion=None, reason="first")
    names = {e.name for e in client.search_experiments()}
    assert {"shared", "shared-records"} <= names and "shared-registry" not in names
    assert [e.batch_id for e in ledger.entries()] == ["b1", "b0"]  # no promotion record here
    assert ledger.is_processed("daily", "b0")
    assert [e.version for e in registry.history()] == [v1]


def test_hand_moves_are_recorded_and_an_ungated_one_is_flagged(store):
    registry = registry_for(store, "hand", "hand")

    def log(decision: str) -> str:
        lineage = {"gate_decision": decision}
        return registry.log_version(store["checkpoint"], lineage=lineage).version

    v1, v2, v3 = log("pass"), log("fail"), log("pass")
    registry.promote(v1, expected_champion=None, reason="first")
    assert reconcile_champion(registry).event is None  # nothing moved: nothing recorded

    registry.client.set_registered_model_alias("hand", "champion", v2)  # as the MLflow UI does
    found = reconcile_champion(registry)
    assert found.ungated and found.event is not None
    assert (found.event.action, found.event.version, found.event.previous) == ("manual", v2, v1)
    assert found.event.reason.startswith("UNGATED") and "'fail'" in found.event.reason
    assert reconcile_champion(registry).event is None  # recorded once
    assert registry.history()[0].actor == "outside evergreen"
    console = Console(record=True, width=250)
    render_history(registry.history(), console)  # what `evergreen history` prints
    shown = console.export_text()
    assert "manual" in shown and "UNGATED" in shown and "outside evergreen" in shown

    registry.client.set_registered_model_alias("hand", "champion", v3)
    found = reconcile_champion(registry)
    assert not found.ungated and "passed the gate" in found.event.reason
    # rollback walks back past hand moves like past promotions
    assert registry.rollback(reason="undo").version == v2

    registry.client.delete_registered_model_alias("hand", "champion")
    found = reconcile_champion(registry)
    assert found.event.version == "" and "removed" in found.event.reason


def test_a_promotion_in_progress_is_not_a_hand_move(store):
    """Between setting the alias and writing its event a promotion holds the lock;
    reconciliation waits for it instead of recording a hand move."""
    registry = registry_for(store, "inflight", "inflight")
    v1 = registry.log_version(store["checkpoint"], lineage={"gate_decision": "pass"}).version
    registry.promote(v1, expected_champion=None, reason="first")
    v2 = registry.log_version(store["checkpoint"], lineage={"gate_decision": "pass"}).version
    found: list = []
    with promotion_lock(registry.model_name, registry.lock_dir):
        registry.client.set_registered_model_alias("inflight", "champion", v2)
        worker = threading.Thread(target=lambda: found.append(reconcile_champion(registry)))
        worker.start()
        time.sleep(1.0)
        assert not found  # blocked on the lock
        registry.record_event(PromotionEvent(now_iso(), "promote", v2, v1, "t", "gated", None))
    worker.join(timeout=60)
    assert found and found[0].event is None


# ---- what a run killed during registration leaves ----------------------------------------------

HOUR = ABANDONED_AFTER_SECONDS


def _undecided_challenger(registry: Registry, store) -> str:
    """A version registered and aliased `challenger` whose run never decided on it."""
    version = registry.log_version(store["checkpoint"], lineage={"gate_decision": "pass"}).version
    registry.set_challenger(version)
    return version


def test_a_young_undecided_challenger_is_kept_an_old_one_cleared(store):
    registry = registry_for(store, "orphan", "orphan")
    v1 = registry.log_version(store["checkpoint"], lineage={"gate_decision": "pass"}).version
    registry.promote(v1, expected_champion=None, reason="first")
    v2 = _undecided_challenger(registry, store)

    # a concurrent flow may still be evaluating it: minutes old, no decision
    assert clear_abandoned(registry, []).challenger is None
    assert registry.aliases() == {"champion": v1, "challenger": v2}

    # an hour later nobody can be: its run was killed between registering and deciding
    later = time.time() + HOUR + 60
    assert clear_abandoned(registry, [], now=later) == Cleanup(challenger=v2)
    assert registry.aliases() == {"champion": v1}
    assert registry.get_version(v2).tags[DECISION_TAG] == ABANDONED
    assert clear_abandoned(registry, [], now=later) == Cleanup()  # nothing left to do


def test_a_decided_challenger_is_cleared_at_once_and_a_moved_alias_kept(store):
    registry = registry_for(store, "decided", "decided")
    v1 = _undecided_challenger(registry, store)
    registry.set_version_tags(v1, {DECISION_TAG: "rejected"})  # died before removing the alias
    assert clear_abandoned(registry, []).challenger == v1
    assert registry.aliases() == {}
    assert registry.get_version(v1).tags[DECISION_TAG] == "rejected"  # its own decision kept

    v2 = _undecided_challenger(registry, store)  # another run's live candidate
    assert clear_abandoned(registry, []).challenger is None
    assert registry.aliases() == {"challenger": v2}
    assert DECISION_TAG not in registry.get_version(v2).tags


def test_orphan_running_runs_older_than_the_timeout_are_marked_killed(store):
    client = MlflowClient(store["uri"])
    registry = registry_for(store, "runs", "runs-exp")
    experiment = client.create_experiment("runs-exp", artifact_location=store["artifacts"])
    elsewhere = client.create_experiment("someone-else", artifact_location=store["artifacts"])
    orphan = client.create_run(experiment, run_name="killed-while-logging").info.run_id
    finished = client.create_run(experiment, run_name="done").info.run_id
    client.update_run(finished, status="FINISHED")
    foreign = client.create_run(elsewhere, run_name="not ours").info.run_id

    # minutes old: possibly a live run still logging its model
    assert clear_abandoned(registry, ["runs-exp", "no-such-experiment"]).killed_runs == ()
    assert client.get_run(orphan).info.status == "RUNNING"

    later = time.time() + HOUR + 60
    cleanup = clear_abandoned(registry, ["runs-exp", "no-such-experiment"], now=later)
    assert cleanup.killed_runs == (orphan,)
    assert client.get_run(orphan).info.status == "KILLED"
    assert client.get_run(orphan).info.end_time is not None
    assert client.get_run(finished).info.status == "FINISHED"
    assert client.get_run(foreign).info.status == "RUNNING"  # other experiments are not ours
