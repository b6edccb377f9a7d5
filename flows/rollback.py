"""Manual: move the champion alias back to the previous (or a chosen) version.

Run: `evergreen rollback [--to N] [--reason TEXT]` or the `rollback` deployment from the UI.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from evergreen.config import load_config
from model_registry.registry import Registry
from tasks.common import current_flow_run_id
from tasks.events import emit
from tasks.limits import ensure_limits, promotion_slot


class RollbackParams(BaseModel):
    config_path: str | None = Field(
        None, description="Path of evergreen.yaml (default: $EVERGREEN_CONFIG or ./evergreen.yaml)."
    )
    overrides: list[str] = Field(default_factory=list, description="Config overrides key=value.")
    to: str | None = Field(None, description="Version to restore (default: the previous champion).")
    reason: str = Field("manual rollback", description="Why: recorded in the promotion history.")


@flow(name="rollback", description="Restore the previous (or a chosen) champion.")
def rollback(params: RollbackParams = RollbackParams()) -> dict:  # noqa: B008 - Prefect form
    cfg = load_config(params.config_path, params.overrides)
    ensure_limits()
    registry = Registry.from_config(cfg)
    with promotion_slot():
        result = registry.rollback(
            to=params.to,
            reason=params.reason,
            actor="flow:rollback",
            flow_run_id=current_flow_run_id(),
        )
    if result.promoted:
        emit(
            "evergreen.model.rolled-back",
            cfg,
            {"version": result.version, "previous": result.previous, "reason": params.reason},
        )
    get_run_logger().info("rollback: %s", result.reason)
    return {
        "rolled_back": result.promoted,
        "champion": result.version,
        "previous": result.previous,
        "reason": result.reason,
    }
