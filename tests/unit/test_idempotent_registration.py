"""Registration is idempotent per flow run, and `challenger` marks only the candidate under
evaluation: cleared when the candidate is rejected or its promotion fails."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from continual.gate_policy import GateDecision
from evergreen.config import EvergreenConfig, config_from_dict
from model_registry.registry import Registry
from tasks import promote
from tasks.promote import Registration, promote_or_reject, register_challenger
from tasks.state import read_state
from tests.checkpoints import tiny_checkpoint

FEATURES = ["f0", "f1"]
CLASSES = [0, 1]


@pytest.fixture
def cfg(tmp_path: Path) -> EvergreenConfig:
    return config_from_dict(
        {
            "home": str(tmp_path / "home"),
            "data": {"features": FEATURES, "label": "y", "classes": CLASSES},
        }
    )


def decision(passed: bool, reasons: tuple[str, ...] | None = None) -> GateDecision:
    return GateDecision(
        promote=passed,
        reasons=reasons or ("gate passed" if passed else "new data: worse beyond the tolerance",),
        new_data=None,
        retention=None,
        challenger_new_accuracy=0.9,
        challenger_retention_accuracy=None,
        negative_flip_rate=None,
    )


def registration(tmp_path: Path, seed: int, *, passed: bool, parent=None) -> Registration:
    state = read_state(tiny_checkpoint(tmp_path / f"ckpt{seed}", seed, FEATURES, CLASSES))
    return Registration(
        cadence="daily-lora",
        method="lora",
        challenger=state,
        parent=parent,
        decision=decision(passed),
        batch_ids=("2026-01-01",),
        data_hash="abc123",
    )


def test_the_promotion_history_keeps_every_reason_whole(cfg, tmp_path, monkeypatch):
    """The history kept the first 400 characters of the gate's reasons, cutting the last one
    mid-word ("… against the fix"); MLflow tags hold 5000 characters."""
    monkeypatch.setattr(promote, "current_flow_run_id", lambda: "run-1")
    reasons = tuple(f"Reason {i}: " + "evidence " * 12 + "holds." for i in range(5))
    reg = dataclasses.replace(
        registration(tmp_path, 0, passed=True), decision=decision(True, reasons)
    )
    version = register_challenger.fn(cfg, reg, staging(tmp_path, "a"))
    assert promote_or_reject.fn(cfg, reg, version).decision == "promoted"
    (event,) = Registry.from_config(cfg).history()
    assert len(event.reason) > 400 and event.reason == "daily-lora: " + " ".join(reasons)


def staging(tmp_path: Path, name: str) -> Path:
    path = tmp_path / "staging" / name
    path.mkdir(parents=True)
    return path


def test_a_retry_of_the_same_flow_run_reuses_the_version(cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(promote, "current_flow_run_id", lambda: "run-1")
    reg = registration(tmp_path, 0, passed=True)
    first = register_challenger.fn(cfg, reg, staging(tmp_path, "a"))
    again = register_challenger.fn(cfg, reg, staging(tmp_path, "b"))  # Prefect retry
    registry = Registry.from_config(cfg)
    assert again.version == first.version
    assert [v.version for v in registry.versions()] == [first.version]
    assert registry.aliases().get("challenger") == first.version


def test_another_flow_run_registers_its_own_version(cfg, tmp_path, monkeypatch):
    reg = registration(tmp_path, 0, passed=True)
    monkeypatch.setattr(promote, "current_flow_run_id", lambda: "run-1")
    first = register_challenger.fn(cfg, reg, staging(tmp_path, "a"))
    monkeypatch.setattr(promote, "current_flow_run_id", lambda: "run-2")
    second = register_challenger.fn(cfg, reg, staging(tmp_path, "b"))
    assert second.version != first.version


def test_registry_log_version_is_idempotent_per_key(cfg, tmp_path):
    registry = Registry.from_config(cfg)
    ckpt = tiny_checkpoint(tmp_path / "c", 1, FEATURES, CLASSES)
    lineage = {"cadence": "daily-lora"}
    a = registry.log_version(ckpt, lineage=lineage, idempotency_key="k1")
    b = registry.log_version(ckpt, lineage=lineage, idempotency_key="k1")
    c = registry.log_version(ckpt, lineage=lineage, idempotency_key="k2")
    assert a.version == b.version != c.version
    assert len(registry.versions()) == 2


def test_rejection_clears_the_challenger_alias(cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(promote, "current_flow_run_id", lambda: "run-1")
    reg = registration(tmp_path, 0, passed=False)
    version = register_challenger.fn(cfg, reg, staging(tmp_path, "a"))
    registry = Registry.from_config(cfg)
    assert registry.aliases().get("challenger") == version.version
    outcome = promote_or_reject.fn(cfg, reg, version)
    assert outcome.decision == "rejected"
    assert "challenger" not in registry.aliases()
    assert registry.get_version(version.version).tags["evergreen.decision"] == "rejected"


def test_a_stale_promotion_clears_the_alias_and_keeps_the_champion(cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(promote, "current_flow_run_id", lambda: "run-1")
    registry = Registry.from_config(cfg)
    champion = registry.log_version(
        tiny_checkpoint(tmp_path / "c", 5, FEATURES, CLASSES), lineage={}
    )
    registry.promote(champion.version, expected_champion=None, reason="bootstrap")
    reg = registration(tmp_path, 0, passed=True)  # evaluated against "no champion": stale
    version = register_challenger.fn(cfg, reg, staging(tmp_path, "a"))
    outcome = promote_or_reject.fn(cfg, reg, version)
    assert outcome.decision == "rejected" and "stale comparison" in outcome.reasons[-1]
    assert registry.aliases() == {"champion": champion.version}


def test_a_failed_promotion_clears_the_alias(cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(promote, "current_flow_run_id", lambda: "run-1")
    reg = registration(tmp_path, 0, passed=True)
    version = register_challenger.fn(cfg, reg, staging(tmp_path, "a"))

    def unreachable(*args, **kwargs):
        raise ConnectionError("tracking server went away")

    monkeypatch.setattr(Registry, "promote", unreachable)
    with pytest.raises(ConnectionError):
        promote_or_reject.fn(cfg, reg, version)
    assert "challenger" not in Registry.from_config(cfg).aliases()


def test_a_retried_promotion_reports_the_promotion_it_made(cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(promote, "current_flow_run_id", lambda: "run-1")
    reg = registration(tmp_path, 0, passed=True)
    version = register_challenger.fn(cfg, reg, staging(tmp_path, "a"))
    assert promote_or_reject.fn(cfg, reg, version).decision == "promoted"
    retry = promote_or_reject.fn(cfg, reg, version)
    assert retry.decision == "promoted" and retry.champion == version.version
    assert len(Registry.from_config(cfg).history()) == 1
