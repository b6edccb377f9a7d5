"""Manual: move the champion alias back to the previous (or a chosen) version.

Run: `evergreen rollback [--to N] [--reason TEXT]` or the `rollback` deployment from the UI.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import begin
from flows.params import CONFIG_PATH, OVERRIDES, REASON, TO, RollbackParams
from tasks.outcome import conclude
from tasks.promote import roll_back

CADENCE = "rollback"


@flow(name=CADENCE, description="Restore the previous (or a chosen) champion.")
def rollback(
    to: str | None = TO,
    reason: str = REASON,
    config_path: str | None = CONFIG_PATH,
    overrides: list[str] = OVERRIDES,
) -> dict[str, Any]:
    params = RollbackParams(**locals())
    cfg = begin(params)
    # the one step: compare-and-set the alias back, recorded in the promotion history
    outcome = roll_back(cfg, to=params.to, reason=params.reason)
    return conclude(cfg, outcome)
