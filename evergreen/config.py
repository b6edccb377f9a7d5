"""The one configuration file, `evergreen.yaml`, as validated pydantic models.

Every command reads it through `load_config(path, overrides)`; `--set key=value` overrides are
parsed as YAML and applied to the nested mapping before validation, so an override is checked
exactly like the file. `EVERGREEN_HOME` overrides `home`.

The sections are defined in modules of their own, in the order the data flows through them:
`config_data` (what a batch must look like, which rows are kept), `config_training` (the model
and one training run), `config_cadences` (each cadence's section) and `config_promotion` (the
gate and the registry). This module composes them into `EvergreenConfig`, whose validator applies
the rules that span sections (`config_families`), loads the file, and re-exports every section:
`from evergreen.config import X` stays the one import path for all of them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator, model_validator

from evergreen.config_base import StrictModel
from evergreen.config_cadences import (
    LAMBDA_GRID,
    BootstrapConfig,
    ConsolidateConfig,
    DailyConfig,
    MonthlyConfig,
    StreamConfig,
    WeeklyConfig,
)
from evergreen.config_data import ChangeConfig, DataConfig, MemoryConfig
from evergreen.config_families import (
    CAUSAL_LM_FAMILY,
    causal_lm_defaults,
    check_distillation,
    check_replay_mix,
    daily_lora_defaults,
    text_classifier_defaults,
)
from evergreen.config_promotion import SAFE_NAME, GateConfig, RegistryConfig
from evergreen.config_training import BUILTIN_FAMILIES, ModelConfig, TrainConfig

# the sections, re-exported (a strict mypy re-exports only what is listed here)
__all__ = [
    "BUILTIN_FAMILIES",
    "DEFAULT_CONFIG_PATH",
    "LAMBDA_GRID",
    "SAFE_NAME",
    "BootstrapConfig",
    "ChangeConfig",
    "ConsolidateConfig",
    "DailyConfig",
    "DataConfig",
    "EvergreenConfig",
    "GateConfig",
    "MemoryConfig",
    "ModelConfig",
    "MonthlyConfig",
    "RegistryConfig",
    "StreamConfig",
    "TrainConfig",
    "WeeklyConfig",
    "apply_override",
    "config_from_dict",
    "load_config",
]

DEFAULT_CONFIG_PATH = Path("evergreen.yaml")


class EvergreenConfig(StrictModel):
    home: str = Field(
        ".evergreen", description="State: MLflow store, artifacts, reports.", validate_default=True
    )
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    monthly: MonthlyConfig = Field(default_factory=MonthlyConfig)
    weekly: WeeklyConfig = Field(default_factory=WeeklyConfig)
    daily: DailyConfig = Field(default_factory=DailyConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    consolidate: ConsolidateConfig = Field(default_factory=ConsolidateConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    bootstrap: BootstrapConfig = Field(default_factory=BootstrapConfig)

    @field_validator("home")
    @classmethod
    def _env_home(cls, value: str) -> str:
        return os.environ.get("EVERGREEN_HOME", value)

    @model_validator(mode="after")
    def _text_needs_a_text_model(self) -> EvergreenConfig:
        family = self.model.family
        if self.data.text and self.data.features:
            raise ValueError("data: set either `features` or `text`, not both")
        check_distillation(self)
        daily_lora_defaults(self)
        if family == CAUSAL_LM_FAMILY:
            causal_lm_defaults(self)
            check_replay_mix(self)
            return self
        if not self.data.classes or self.data.text_only:
            raise ValueError(
                "data.classes needs at least two classes (only model.family hf-causal-lm, "
                "which learns text without labels, goes without)"
            )
        if self.data.text and not (family == "hf" and self.model.hf_path):
            raise ValueError(
                f"data.text is set: use model.family: hf (classification) or hf-causal-lm "
                f"(continual pre-training) with model.hf_path (a local model directory or "
                f"package:NAME), got family {family!r}"
            )
        if family == "hf" and not self.data.text:
            raise ValueError("model.family hf reads text: set data.text (the text column)")
        if family == "hf":
            text_classifier_defaults(self)
        check_replay_mix(self)
        return self

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
    """Read `path` (default: $EVERGREEN_CONFIG, else the nearest evergreen.yaml, else the demo's
    pointer: `evergreen.home.find_config`), apply overrides, validate.

    Raises:
        FileNotFoundError: no config file (with a hint to run `evergreen init`).
        pydantic.ValidationError: a key is unknown or a value is invalid.
    """
    from evergreen.home import find_config

    config_path = find_config(path).path
    tree = yaml.safe_load(config_path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ValueError(f"{config_path}: expected a mapping at the top level")
    for assignment in overrides:
        apply_override(tree, assignment)
    _anchor_relative_paths(tree, config_path.resolve().parent)
    return EvergreenConfig.model_validate(tree)


def _anchor_relative_paths(tree: dict[str, Any], folder: Path) -> None:
    """Relative `home`, local `data.landing` and a local `model.hf_path` are relative to the
    config file, not to the working directory, so a command run from a sub-folder (which finds
    the nearest evergreen.yaml) uses the same state, and a text version's spec names its base
    model by a path that holds from any directory it is served from. `$EVERGREEN_HOME` stays
    relative to the working directory.
    """
    home = tree.get("home", ".evergreen")
    if isinstance(home, str) and not Path(home).expanduser().is_absolute():
        tree["home"] = str(folder / home)
    model = tree.get("model")
    hf_path = model.get("hf_path") if isinstance(model, dict) else None
    if (
        isinstance(model, dict)
        and isinstance(hf_path, str)
        and hf_path
        and not hf_path.startswith("package:")
        and not Path(hf_path).expanduser().is_absolute()
    ):
        model["hf_path"] = str(folder / hf_path)
    data = tree.get("data")
    if not isinstance(data, dict):
        return  # validation names the missing section
    landing = data.get("landing", "./landing")
    if isinstance(landing, str) and "://" not in landing and not Path(landing).is_absolute():
        data["landing"] = str(folder / landing)


def config_from_dict(
    tree: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()
) -> EvergreenConfig:
    """Validate a config given as a mapping (flow parameters, tests)."""
    tree = yaml.safe_load(yaml.safe_dump(tree))
    for assignment in overrides:
        apply_override(tree, assignment)
    return EvergreenConfig.model_validate(tree)
