"""The `data:` section of `evergreen.yaml` and the data memory (`memory:`): what a batch must
look like, how validation weighs change against corruption, and which rows the pipeline keeps.

Everything `data_plane` reads of the config is here; `evergreen.config` re-exports these names.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from evergreen.config_base import StrictModel
from evergreen.config_families import TEXT_ONLY_CLASSES


class ChangeConfig(StrictModel):
    """How validation treats *change* (as opposed to corruption, which always blocks)."""

    block: list[Literal["range", "drift", "class_mix", "text_drift"]] = Field(
        default_factory=list,
        description="Informing checks to make blocking: 'range' (values beyond the range accepted "
        "so far, with `range_mostly`), 'drift' (KS+PSI), 'class_mix' (a new class mix), "
        "'text_drift' (text length or vocabulary change).",
    )
    range_mostly: float = Field(
        0.99,
        gt=0,
        le=1,
        description="Share of a column's values that must lie in the accepted range for the "
        "range check to pass (GX `mostly`): one extreme value never decides anything.",
    )
    gross_change: bool = Field(
        True,
        description="Block batch-wide breakage: most features far outside everything accepted "
        "so far (a producer switching units).",
    )
    gross_range_factor: float = Field(
        1.0, gt=0, description="'Far' = more than this many accepted-range widths beyond it."
    )
    gross_value_share: float = Field(
        0.25, gt=0, le=1, description="A feature is displaced when this share of it is far out."
    )
    gross_displaced_share: float = Field(
        0.5, gt=0, le=1, description="The batch is broken when this share of features is displaced."
    )
    drift_psi: float = Field(0.2, gt=0, description="PSI at which a significant KS shift counts.")
    class_mix_threshold: float = Field(
        0.3, gt=0, le=1, description="Total-variation distance of the class mix worth reporting."
    )
    drift_event_share: float = Field(
        0.25,
        gt=0,
        le=1,
        description="Share of drifted features at which validation emits evergreen.drift.detected.",
    )


class DataConfig(StrictModel):
    landing: str = Field(
        "./landing", description="Landing zone: a local folder or s3://bucket/prefix."
    )
    features: list[str] = Field(default_factory=list, description="Numeric feature columns.")
    text: str | None = Field(None, description="Text column (for text models) instead of features.")
    max_text_chars: int = Field(
        20_000,
        ge=1,
        description="Text models: a row longer than this many characters blocks the batch (a "
        "whole file pasted into one cell, a broken export); rows are truncated to "
        "model.max_length tokens anyway.",
    )
    label: str = Field("label", description="Label column.")
    classes: list[Any] = Field(
        default_factory=list,
        description="Every class the model may predict, in a fixed order (required, except for "
        "model.family hf-causal-lm, which learns the text and has no labels).",
    )
    select_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Share of each batch that selects: λ calibration (`ewc_lambda: auto`) and "
        "the daily LoRA's keep/discard screen; never trained on, never gated on.",
    )
    gate_fraction: float = Field(
        0.25, gt=0, lt=1, description="Share of each batch the promotion gate scores."
    )
    split_salt: str = Field(
        "evergreen",
        description="Salt of the row-hash split; never the batch id, so a row that lands twice "
        "has the same role both times. Changing it reshuffles every role.",
    )
    min_rows: int = Field(20, ge=1, description="Fewest rows a batch may have.")
    max_rows: int = Field(5_000_000, ge=1, description="Most rows a batch may have.")
    max_duplicate_fraction: float = Field(0.2, ge=0, le=1, description="Tolerated duplicate rows.")
    feature_bounds: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="Declared [min, max] per feature: values outside block the batch. Features "
        "not listed only have to be finite; their range is tracked as information.",
    )
    extra_columns: Literal["block", "ignore"] = Field(
        "block", description="Columns in the files that the config does not list."
    )
    new_class_policy: Literal["quarantine"] = Field(
        "quarantine", description="What to do with labels outside `classes`."
    )
    change: ChangeConfig = Field(default_factory=ChangeConfig)
    data_docs_keep: int = Field(
        30,
        ge=1,
        description="Great Expectations validation results (and their Data Docs pages) kept "
        "under <home>/gx, newest first; every batch's own report under "
        "<home>/reports/validation is kept regardless. Bounds the Data Docs index each "
        "validation rebuilds.",
    )
    gx_store: str | None = Field(
        None,
        description="Where the Great Expectations stores live: empty for the folder <home>/gx "
        "(one worker), or s3://bucket/prefix shared by every worker (suite, checkpoints, "
        "validation results and the Data Docs site; each worker syncs its <home>/gx with it "
        "and the Data Docs links point into the bucket). Endpoint and credentials come from "
        "the AWS environment, as for data.landing.",
    )
    arrival_quiescence_seconds: float = Field(
        30.0,
        ge=0,
        description="A batch folder with no `_SUCCESS` or `_manifest.json` counts as arrived once "
        "none of its files changed for this long (a multi-file upload is not atomic); a run "
        "waits this long at most for a batch that just landed.",
    )

    @model_validator(mode="after")
    def _features_or_text(self) -> DataConfig:
        if not self.features and not self.text:
            raise ValueError("data: set `features` (numeric columns) or `text` (a text column)")
        if len(set(map(str, self.classes))) != len(self.classes):
            raise ValueError("data.classes has duplicates")
        if self.classes and len(self.classes) < 2 and self.classes != TEXT_ONLY_CLASSES:
            raise ValueError("data.classes needs at least two classes")
        if self.select_fraction + self.gate_fraction >= 0.9:
            raise ValueError(
                "data.select_fraction + data.gate_fraction must stay below 0.9 so that most of "
                "each batch trains"
            )
        unknown = sorted(set(self.feature_bounds) - set(self.features))
        if unknown:
            raise ValueError(f"data.feature_bounds names columns not in data.features: {unknown}")
        self._check_columns()
        return self

    @property
    def text_only(self) -> bool:
        """Whether batches hold text alone (a causal LM: no label column, no classes)."""
        return self.classes == TEXT_ONLY_CLASSES

    def _check_columns(self) -> None:
        """Every column has one role: a feature, the text, or the label."""
        duplicated = sorted({c for c in self.features if self.features.count(c) > 1})
        if duplicated:
            raise ValueError(f"data.features lists {duplicated} more than once")
        if self.label in self.features or self.label == self.text:
            raise ValueError(f"data.label {self.label!r} is also a feature/text column")
        if self.text and self.text in self.features:
            raise ValueError(f"data.text {self.text!r} is also listed in data.features")
        inverted = sorted(k for k, (low, high) in self.feature_bounds.items() if not low < high)
        if inverted:
            raise ValueError(f"data.feature_bounds {inverted}: expected [min, max] with min < max")

    @field_validator("gx_store")
    @classmethod
    def _gx_store_uri(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.startswith("s3://") or not value[len("s3://") :].split("/", 1)[0]:
            raise ValueError(
                f"data.gx_store {value!r}: expected s3://bucket/prefix (or leave it empty for "
                "the local <home>/gx)"
            )
        return value.rstrip("/")

    @field_validator("landing")
    @classmethod
    def _landing_uri(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("data.landing is empty: a local folder or s3://bucket/prefix")
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in ("", "file", "s3"):
            raise ValueError(
                f"data.landing {value!r}: unsupported scheme {scheme!r}; use a local folder or "
                "s3://bucket/prefix"
            )
        if scheme == "s3" and not value[len("s3://") :].split("/", 1)[0]:
            raise ValueError(f"data.landing {value!r} has no bucket (s3://bucket/prefix)")
        return value


class MemoryConfig(StrictModel):
    """The pipeline's data memory, shared by every cadence (model_registry/memory.py)."""

    replay_capacity: int = Field(
        5000, gt=0, description="Reservoir of training rows over every accepted batch."
    )
    replay_policy: Literal["reservoir", "class_balanced"] = Field(
        "reservoir", description="reservoir: uniform over the stream; class_balanced: per class."
    )
    held_out_per_batch: int = Field(
        400, gt=0, description="Held-out rows kept per batch and role (select, gate)."
    )
    held_out_max_rows: int = Field(
        6000, gt=0, description="Bound on the held-out rows kept per role over all batches."
    )
    seed: int = Field(0, description="Seeds the replay buffer's sampling.")
