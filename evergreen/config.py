"""The one configuration file, `evergreen.yaml`, as validated pydantic models.

Every command reads it through `load_config(path, overrides)`; `--set key=value` overrides are
parsed as YAML and applied to the nested mapping before validation, so an override is checked
exactly like the file. `EVERGREEN_HOME` overrides `home`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_CONFIG_PATH = Path("evergreen.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    landing: str = Field(
        "./landing", description="Landing zone: a local folder or s3://bucket/prefix."
    )
    features: list[str] = Field(default_factory=list, description="Numeric feature columns.")
    text: str | None = Field(None, description="Text column (for text models) instead of features.")
    label: str = Field("label", description="Label column.")
    classes: list[Any] = Field(
        ..., description="Every class the model may predict, in a fixed order."
    )
    holdout_fraction: float = Field(0.25, gt=0, lt=1, description="Share of each batch held out.")
    retention_per_batch: int = Field(200, gt=0, description="Held-out rows kept per batch.")
    retention_max_rows: int = Field(3000, gt=0, description="Bound on the whole retention set.")
    min_rows: int = Field(20, ge=1, description="Fewest rows a batch may have.")
    max_rows: int = Field(5_000_000, ge=1, description="Most rows a batch may have.")
    max_duplicate_fraction: float = Field(0.2, ge=0, le=1, description="Tolerated duplicate rows.")
    feature_bounds: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="Optional [min, max] per feature; missing features get bounds from bootstrap.",
    )
    new_class_policy: Literal["quarantine"] = Field(
        "quarantine", description="What to do with labels outside `classes`."
    )

    @model_validator(mode="after")
    def _features_or_text(self) -> DataConfig:
        if not self.features and not self.text:
            raise ValueError("data: set `features` (numeric columns) or `text` (a text column)")
        if len(set(map(str, self.classes))) != len(self.classes):
            raise ValueError("data.classes has duplicates")
        if len(self.classes) < 2:
            raise ValueError("data.classes needs at least two classes")
        return self


class ModelConfig(_Strict):
    family: str = Field(
        "mlp", description='"mlp", "transformer", "hf", or "package.module:factory".'
    )
    hidden: list[int] = Field(default_factory=lambda: [128, 64], description="MLP hidden sizes.")
    d_model: int = Field(32, description="Transformer width.")
    n_heads: int = Field(4, description="Transformer attention heads.")
    n_layers: int = Field(2, description="Transformer blocks.")
    n_tokens: int = Field(8, description="Transformer: features are split into this many tokens.")
    dropout: float = Field(0.0, ge=0, lt=1)
    hf_path: str | None = Field(None, description="Local directory of a Hugging Face model.")


class RegistryConfig(_Strict):
    tracking_uri: str | None = Field(None, description="null = embedded SQLite under home.")
    name: str = Field("evergreen", description="Registered model name.")
    experiment: str = Field("evergreen", description="MLflow experiment for runs.")


class TrainConfig(_Strict):
    steps: int = Field(300, gt=0, description="Optimiser steps (count steps, not epochs).")
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0


class MonthlyConfig(_Strict):
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=400, lr=1e-3))
    ewc_lambda: float = Field(1000.0, ge=0, description="EWC strength (per-example Fisher).")
    fisher_decay: float = Field(0.9, ge=0, le=1, description="Online EWC: F = gamma*F_old + F_new.")


class WeeklyConfig(_Strict):
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=300, lr=1e-3))
    ewc_lambda: float = Field(500.0, ge=0)
    fisher_decay: float = Field(0.9, ge=0, le=1)
    replay_capacity: int = Field(2000, gt=0, description="Reservoir size (examples).")
    replay_ratio: float = Field(0.4, ge=0, lt=1, description="Share of each step from the buffer.")
    replay_policy: Literal["reservoir", "class_balanced"] = "reservoir"


class DailyConfig(_Strict):
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=150, lr=3e-3))
    lora_r: int = Field(8, gt=0)
    lora_alpha: int = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="None: q_proj/v_proj where present.")
    max_regression: float = Field(
        0.01, ge=0, description="Validation accuracy the adapter may lose before it is discarded."
    )
    replay_ratio: float = Field(0.3, ge=0, lt=1, description="Retention rows mixed into training.")


class StreamConfig(_Strict):
    ema_decay: float = Field(0.99, gt=0, lt=1)
    ph_delta: float = Field(0.005, ge=0)
    ph_threshold: float | None = Field(None, description="None: calibrate on the retention set.")
    ph_min_samples: int = Field(30, gt=0)
    micro_batch: int = Field(16, gt=0)
    lr: float = Field(1e-3, gt=0)


class ConsolidateConfig(_Strict):
    mode: Literal["ema", "interpolate"] = "ema"
    decay: float = Field(0.5, gt=0, lt=1, description="EMA decay over the lineage (old weight).")
    alpha: float = Field(0.5, ge=0, le=1, description="Interpolation weight of the champion.")
    lineage: int = Field(3, ge=2, description="How many recent champions to consolidate.")


class GateConfig(_Strict):
    new_data_tolerance: float = Field(0.01, ge=0, description="Allowed drop on the new batch.")
    retention_tolerance: float = Field(0.02, ge=0, description="Allowed drop on retention.")
    confidence: float = Field(0.95, gt=0.5, lt=1)
    min_accuracy: float = Field(0.0, ge=0, le=1, description="Floor for the first champion.")
    n_bootstrap: int = Field(2000, gt=99)


class EvergreenConfig(_Strict):
    home: str = Field(
        ".evergreen", description="State: MLflow store, artifacts, reports.", validate_default=True
    )
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    monthly: MonthlyConfig = Field(default_factory=MonthlyConfig)
    weekly: WeeklyConfig = Field(default_factory=WeeklyConfig)
    daily: DailyConfig = Field(default_factory=DailyConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    consolidate: ConsolidateConfig = Field(default_factory=ConsolidateConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    bootstrap_train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=600))

    @field_validator("home")
    @classmethod
    def _env_home(cls, value: str) -> str:
        return os.environ.get("EVERGREEN_HOME", value)

    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser().resolve()

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI: configured, else `MLFLOW_TRACKING_URI`, else SQLite under
        home (the embedded default)."""
        if self.registry.tracking_uri:
            return self.registry.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{self.home_path / 'mlflow.db'}"

    @property
    def artifact_location(self) -> str:
        return (self.home_path / "mlartifacts").as_uri()


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one `key.path=value` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys:
        raise ValueError(f"--set has an empty key: {assignment!r}")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ValueError(f"--set {dotted}: {key!r} is not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(raw)


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> EvergreenConfig:
    """Read `path` (default: $EVERGREEN_CONFIG, else ./evergreen.yaml), apply overrides, validate.

    Raises:
        FileNotFoundError: the file does not exist (with a hint to run `evergreen init`).
        pydantic.ValidationError: a key is unknown or a value is invalid.
    """
    config_path = Path(path or os.environ.get("EVERGREEN_CONFIG") or DEFAULT_CONFIG_PATH)
    if not config_path.exists():
        raise FileNotFoundError(
            f"config file {config_path} not found: run `evergreen init` to write an example"
        )
    tree = yaml.safe_load(config_path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ValueError(f"{config_path}: expected a mapping at the top level")
    for assignment in overrides:
        apply_override(tree, assignment)
    return EvergreenConfig.model_validate(tree)


def config_from_dict(
    tree: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()
) -> EvergreenConfig:
    """Validate a config given as a mapping (flow parameters, tests)."""
    tree = yaml.safe_load(yaml.safe_dump(tree))
    for assignment in overrides:
        apply_override(tree, assignment)
    return EvergreenConfig.model_validate(tree)
