"""Where a challenger goes after training: the promotion gate (`gate:`, which decides) and the
model registry (`registry:`, where MLflow records the versions, under names that also name the
pipeline's Prefect limits). `evergreen.config` re-exports these names.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from evergreen.config_base import StrictModel


class GateConfig(StrictModel):
    """The promotion gate (continual/gating.py); defaults measured in benchmarks/bench_gate.py."""

    new_data_tolerance: float = Field(
        0.05, ge=0, lt=1, description="Non-inferiority margin on the new batches' gate rows."
    )
    retention_tolerance: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Non-inferiority margin on the retention set, per promotion (the evidence "
        "margin; what may really be lost over time is `forgetting_budget`).",
    )
    confidence: float = Field(0.95, gt=0.5, lt=1, description="One-sided confidence level.")
    new_data_rule: Literal["non_inferior", "superior"] = Field(
        "non_inferior", description="Require only non-inferiority on new data, or improvement."
    )
    forgetting_budget: float = Field(
        0.025,
        ge=0,
        lt=1,
        description="Allowed cumulative loss vs the fixed per-batch reference accuracies.",
    )
    min_examples: int = Field(
        500, ge=1, description="Fewer paired examples flag the gate as underpowered."
    )
    exchange_gain: float | None = Field(
        0.10,
        gt=0,
        lt=1,
        description="A challenger whose new-data gain is proven (one-sided lower bound) to be at "
        "least this, and whose net change on new + retention rows together is positive, "
        "may give up retention up to exchange_max_loss (point estimate): new classes or a strong "
        "drift cost some old accuracy even for joint training. null: never.",
    )
    exchange_max_loss: float = Field(
        0.10,
        ge=0,
        lt=1,
        description="The most an exchange may give up: retention loss and cumulative forgetting "
        "(point estimates; retention_tolerance when that is larger). The earlier batches' references then fall to what the promoted "
        "challenger keeps, so the traded loss is not charged again.",
    )
    min_accuracy: float = Field(0.0, ge=0, le=1, description="Floor for the first champion.")
    n_bootstrap: int = Field(2000, gt=99)


# Registered model and experiment names end up in MLflow search filters, Prefect concurrency
# limit names and lock-file names: keep them to characters that are safe in all three.
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class RegistryConfig(StrictModel):
    tracking_uri: str | None = Field(
        None, description="null = $MLFLOW_TRACKING_URI if set, else embedded SQLite under home."
    )
    name: str = Field(
        "evergreen",
        pattern=SAFE_NAME,
        description="Registered model name (letters, digits, . _ -; also names the pipeline's "
        "Prefect concurrency limits).",
    )
    experiment: str = Field(
        "evergreen", pattern=SAFE_NAME, description="MLflow experiment for runs."
    )
