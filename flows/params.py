"""The flows' parameters: pydantic models the Prefect UI renders as forms with descriptions."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ConfigParams(BaseModel):
    """Where a run finds its configuration."""

    config_path: str | None = Field(
        None,
        description="Path of evergreen.yaml. Empty: the Prefect Variable `evergreen_config` (a "
        "path or the YAML itself, editable under Variables), else $EVERGREEN_CONFIG, else the "
        "nearest evergreen.yaml from the worker's directory.",
    )
    overrides: list[str] = Field(
        [],  # a literal default (pydantic copies it) so the run form shows it
        description="Config overrides as key=value (value parsed as YAML), e.g. daily.lora_r=16.",
    )


class FlowParams(ConfigParams):
    """Parameters every cadence flow accepts."""

    batch_ids: list[str] | None = Field(
        None, description="Process exactly these batches (default: every pending batch)."
    )
    until: str | None = Field(
        None, description="Only batches whose id sorts at or before this (e.g. 2026-11-21)."
    )
    max_batches: int | None = Field(None, ge=1, description="At most this many pending batches.")
    force: bool = Field(False, description="Reprocess batches the ledger marks as processed.")


class StreamParams(FlowParams):
    promote_ema: bool = Field(
        False, description="Also gate the EMA weights as a challenger (default: monitor only)."
    )


class MergeParams(ConfigParams):
    versions: list[str] = Field(
        ..., min_length=2, description="Model versions to merge, e.g. [3, 5]."
    )
    eps: float = Field(
        1e-8, gt=0, description="Weight floor, relative to each tensor's Fisher scale."
    )


class RollbackParams(ConfigParams):
    to: str | None = Field(None, description="Version to restore (default: the previous champion).")
    reason: str = Field("manual rollback", description="Why: recorded in the promotion history.")
