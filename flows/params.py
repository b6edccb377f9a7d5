"""The flows' parameters: one flat, typed, documented field each, so the Prefect UI's "Custom run"
form shows every knob with its description and default (no nested object to expand).

Each field is declared once here as a pydantic `Field` and used twice: as the default of the flow
function's parameter (Prefect builds the form and validates runs from the signature, including
the field's description and bounds) and in the parameter model the flow body works with
(`FlowParams(**locals())`). `tests/unit/test_prefect_ui.py` checks the two agree.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

BATCH_IDS: Any = Field(
    None,
    description='Process exactly these batches, e.g. ["2026-11-21"] (default: every pending batch).',
)
FORCE: Any = Field(
    False, description="Reprocess batches the ledger marks as processed (recorded as forced)."
)
UNTIL: Any = Field(
    None, description="Only batches whose id sorts at or before this (e.g. 2026-11-21)."
)
MAX_BATCHES: Any = Field(None, ge=1, description="At most this many pending batches.")
CONFIG_PATH: Any = Field(
    None,
    description="Path of evergreen.yaml. Empty: the Prefect Variable `evergreen_config` (a path "
    "or the YAML itself, editable under Variables), else $EVERGREEN_CONFIG, else the nearest "
    "evergreen.yaml from the worker's directory.",
)
OVERRIDES: Any = Field(
    [],  # a literal default (pydantic copies it) so the run form shows it
    description="Config overrides as key=value (value parsed as YAML), e.g. daily.lora_r=16.",
)
PROMOTE_EMA: Any = Field(
    False, description="Also gate the EMA weights as a challenger (default: monitor only)."
)
VERSIONS: Any = Field(..., min_length=2, description='Model versions to merge, e.g. ["3", "5"].')
EPS: Any = Field(1e-8, gt=0, description="Weight floor, relative to each tensor's Fisher scale.")
MERGE_METHOD: Any = Field(
    "fisher",
    description="fisher: weigh each parameter by each version's own Fisher; linear: the plain "
    "mean of the versions (the baseline); ties, dare, dare_ties: peft's TIES / DARE / DARE-TIES "
    "on the task vectors θ_v − θ_ancestor against the versions' nearest common registered "
    "ancestor (refused when they have none). All on full weights: a LoRA version is folded "
    "first, so its task vector is its ΔW = (α/r)·B·A.",
)
DENSITY: Any = Field(
    None,
    gt=0,
    le=1,
    description="ties/dare/dare_ties: fraction of each task vector's entries kept (TIES: the "
    "largest by magnitude per tensor; DARE: a random draw, survivors scaled by 1/density). "
    "Empty: 0.2 for ties (the TIES paper's top 20 %), 0.5 for dare and dare_ties.",
)
SEED: Any = Field(
    0, ge=0, description="dare/dare_ties: seed of the random drop (the same seed, the same merge)."
)
TO: Any = Field(None, description="Version to restore (default: the previous champion).")
REASON: Any = Field("manual rollback", description="Why: recorded in the promotion history.")
TRIGGER: Any = Field(
    None,
    description="What started this run, recorded on it (log, MLflow tag `evergreen.trigger`). "
    "The drift automation fills it with the event as JSON (event, id, occurred, model, details: "
    "the monitor's batches, champion version, statistic); free text when set by hand.",
)


class ConfigParams(BaseModel):
    """Where a run finds its configuration."""

    config_path: str | None = CONFIG_PATH
    overrides: list[str] = OVERRIDES


class FlowParams(ConfigParams):
    """Parameters every cadence flow accepts."""

    batch_ids: list[str] | None = BATCH_IDS
    until: str | None = UNTIL
    max_batches: int | None = MAX_BATCHES
    force: bool = FORCE


class TriggeredParams(FlowParams):
    """A cadence an automation starts (prefect.yaml `triggers`): it is told why."""

    trigger: str | None = TRIGGER


class StreamParams(FlowParams):
    promote_ema: bool = PROMOTE_EMA


class MergeParams(ConfigParams):
    versions: list[str] = VERSIONS
    eps: float = EPS
    method: Literal["fisher", "linear", "ties", "dare", "dare_ties"] = MERGE_METHOD
    density: float | None = DENSITY
    seed: int = SEED

    @field_validator("versions")
    @classmethod
    def _distinct(cls, versions: list[str]) -> list[str]:
        """A version named twice is not a merge (`--versions 3 3` registered a copy of v3)."""
        if len(set(versions)) < len(versions):
            raise ValueError(f"name distinct versions to merge (got {versions})")
        return versions


class RollbackParams(ConfigParams):
    to: str | None = TO
    reason: str = REASON
