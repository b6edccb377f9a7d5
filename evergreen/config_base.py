"""The base every section of `evergreen.yaml` derives from (`evergreen.config` and its
`config_*` modules), kept apart so that each of those modules can import it without the others.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A config section that refuses what pydantic would otherwise let through."""

    # unknown keys are typos; NaN/inf pass `gt=`/`le=` bounds in pydantic unless refused here
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
