"""The few lines every cadence flow starts and ends with."""

from __future__ import annotations

from prefect import get_run_logger

from evergreen.config import EvergreenConfig
from tasks.common import FlowParams, flow_config
from tasks.limits import ensure_limits
from tasks.promote import FlowOutcome, record_outcome


class NoChampionError(RuntimeError):
    """A cadence that updates the champion ran before `bootstrap` registered one."""


def begin(params: FlowParams) -> EvergreenConfig:
    """Load the run's config and make sure the concurrency limits exist on this Prefect API."""
    cfg = flow_config(params)
    if cfg.data.text and not cfg.data.features:
        raise NotImplementedError(
            "text pipelines (data.text) are not wired into the flows yet: continual/ has the local "
            "Hugging Face loader, but the flows train on numeric `data.features` only"
        )
    cfg.home_path.mkdir(parents=True, exist_ok=True)
    ensure_limits()
    return cfg


def nothing_to_do(cadence: str) -> dict:
    get_run_logger().info("%s: no pending batches — nothing to do", cadence)
    return FlowOutcome(
        cadence=cadence, decision="skipped", reasons=["no pending batches"]
    ).to_dict()


def all_quarantined(cfg: EvergreenConfig, cadence: str, quarantined: list[str]) -> dict:
    """Every batch failed validation: the champion stays; say so loudly and actionably."""
    outcome = FlowOutcome(
        cadence=cadence,
        decision="quarantined",
        quarantined=quarantined,
        reasons=[
            f"batches {quarantined} failed validation and were quarantined (files untouched); "
            f"see {cfg.home_path / 'reports' / 'validation' / cadence}/<batch_id>.md, fix the data "
            "and land it under a new batch_id (or rerun with force=true)"
        ],
    )
    record_outcome(cfg, outcome, ledger=False)
    return outcome.to_dict()


def require_champion(champion, cadence: str):
    if champion is None:
        raise NoChampionError(f"{cadence} needs a champion: run `evergreen run bootstrap` first")
    return champion
