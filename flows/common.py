"""The few lines every cadence flow starts and ends with."""

from __future__ import annotations

from evergreen.config import EvergreenConfig, load_config
from flows.params import ConfigParams, FlowParams
from tasks.ingest import BatchSelection
from tasks.limits import ensure_limits
from tasks.outcome import FlowOutcome
from tasks.state import ModelState


class NoChampionError(RuntimeError):
    """A cadence that updates the champion ran before `bootstrap` registered one."""


def begin(params: ConfigParams) -> EvergreenConfig:
    """Load the run's config and make sure the concurrency limits exist on this Prefect API."""
    cfg = load_config(params.config_path, params.overrides)
    cfg.home_path.mkdir(parents=True, exist_ok=True)
    ensure_limits()
    return cfg


def selection(params: FlowParams) -> BatchSelection:
    """The run's batch selection, from its parameters."""
    return BatchSelection(
        batch_ids=tuple(params.batch_ids) if params.batch_ids else None,
        until=params.until,
        max_batches=params.max_batches,
        force=params.force,
    )


def nothing_to_do(cadence: str) -> FlowOutcome:
    return FlowOutcome(cadence=cadence, decision="skipped", reasons=["no pending batches"])


def all_quarantined(cfg: EvergreenConfig, cadence: str, quarantined: dict[str, str]) -> FlowOutcome:
    """Every batch failed validation: the champion stays; say so loudly and actionably."""
    return FlowOutcome(
        cadence=cadence,
        decision="quarantined",
        quarantined=quarantined,
        reasons=[
            f"batches {sorted(quarantined)} failed validation and were quarantined (files "
            f"untouched); see {cfg.home_path / 'reports' / 'validation' / cadence}/<batch_id>.md, "
            "fix the data and land it under a new batch_id (or rerun with force=true)"
        ],
    )


def require_champion(champion: ModelState | None, cadence: str) -> ModelState:
    if champion is None:
        raise NoChampionError(f"{cadence} needs a champion: run `evergreen run bootstrap` first")
    return champion
