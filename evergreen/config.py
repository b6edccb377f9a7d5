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
from pydantic import Field, field_validator, model_validator

from evergreen.config_base import StrictModel
from evergreen.config_data import ChangeConfig, DataConfig, MemoryConfig
from evergreen.config_families import (
    CAUSAL_LM_FAMILY,
    causal_lm_defaults,
    check_distillation,
    check_replay_mix,
    daily_lora_defaults,
    text_classifier_defaults,
)

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


# Registered model and experiment names end up in MLflow search filters, Prefect concurrency
# limit names and lock-file names: keep them to characters that are safe in all three.
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
BUILTIN_FAMILIES = ("mlp", "transformer", "hf", "hf-causal-lm")


class ModelConfig(StrictModel):
    family: str = Field(
        "mlp", description='"mlp", "transformer", "hf", or "package.module:factory".'
    )
    hidden: list[int] = Field(default_factory=lambda: [128, 64], description="MLP hidden sizes.")
    d_model: int = Field(32, description="Transformer width.")
    n_heads: int = Field(4, description="Transformer attention heads.")
    n_layers: int = Field(2, description="Transformer blocks.")
    n_tokens: int = Field(8, description="Transformer: features are split into this many tokens.")
    dropout: float = Field(0.0, ge=0, lt=1)
    hf_path: str | None = Field(
        None,
        description='Local directory of a Hugging Face model, or "package:NAME" for a model '
        "shipped inside an installed Python package (never downloaded).",
    )
    max_length: int = Field(
        128, ge=8, le=8192, description="Text models: tokens per row (longer rows are truncated)."
    )

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        module, _, factory = value.partition(":")
        if value in BUILTIN_FAMILIES or (module and factory and "." not in factory):
            return value
        raise ValueError(
            f"model.family {value!r}: expected one of {list(BUILTIN_FAMILIES)} or "
            '"package.module:factory"'
        )

    @model_validator(mode="after")
    def _sizes(self) -> ModelConfig:
        sizes = {"d_model": self.d_model, "n_heads": self.n_heads, "n_layers": self.n_layers}
        sizes["n_tokens"] = self.n_tokens
        bad = sorted(k for k, v in sizes.items() if v < 1)
        if bad or any(h < 1 for h in self.hidden):
            raise ValueError(
                f"model: sizes must be >= 1 (got {bad or 'hidden ' + str(self.hidden)})"
            )
        if self.family == "transformer" and self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}"
            )
        if self.family.startswith("hf") and not self.hf_path:
            raise ValueError(
                f"model.family {self.family!r} needs model.hf_path (a local directory or "
                "package:NAME)"
            )
        return self


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


def _env_processes() -> int:
    """`EVERGREEN_TRAIN_PROCESSES` (set by the Kubernetes GPU pool's `train_processes` job
    variable), else 1: the process count of every training section that does not set one."""
    raw = os.environ.get("EVERGREEN_TRAIN_PROCESSES", "").strip() or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"EVERGREEN_TRAIN_PROCESSES must be a whole number >= 1, got {raw!r}")
    return int(raw)


class TrainConfig(StrictModel):
    steps: int = Field(300, gt=0, description="Fewest optimiser steps (count steps, not epochs).")
    epochs: float = Field(
        0.0,
        ge=0,
        description="Also at least this many passes over the new training rows (0: steps only); "
        "large batches then get enough steps without hand-tuning `steps`. A pass is "
        "⌈rows / batch_size⌉ steps, replayed rows included: at `replay_ratio` r each new row is "
        'seen only ≈ (1 − r) × `epochs` times (docs/CONTRACTS.md, "Step counts").',
    )
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    processes: int = Field(
        default_factory=lambda: _env_processes(),
        ge=1,
        description="Processes to train with: above 1 the training runs under torchrun (DDP, "
        "gloo on CPU, NCCL on GPUs), each rank on a shard of the rows; the global batch stays "
        "`batch_size`. Unset: $EVERGREEN_TRAIN_PROCESSES, else 1.",
    )
    timeout_minutes: float = Field(
        60.0,
        gt=0,
        description="Wall-clock limit of the section's training task (Prefect task timeout): a "
        "run that reaches it fails, its batches stay pending and the next run starts over. "
        "Raise it for long (GPU, large-data) runs; λ 'auto' trains every candidate within it.",
    )
    checkpoint_every_steps: int = Field(
        0,
        ge=0,
        description="Save the training state (weights, optimiser, RNG states, step) every this "
        "many steps, so a run killed mid-training (SIGKILL, node pre-emption) resumes where it "
        "was instead of starting over; 0: not by steps. Kept under <home>/resume until the run "
        "ends; resumed only by a run of the same cadence on the same batches, champion and "
        "training config. Not with processes > 1.",
    )
    checkpoint_every_seconds: float = Field(
        300.0,
        ge=0,
        description="Also save it when this many seconds passed since the last save (0: not by "
        "time; both 0: never, a killed run starts over).",
    )
    grad_accum_steps: int = Field(
        1,
        ge=1,
        description="Micro-batches per optimiser step: each step's `batch_size` rows run as this "
        "many micro-batches whose gradients add up to the whole batch's (losses weighted by "
        "rows, or predicted tokens for a causal LM) — same update, a k-th of the activation "
        "memory. `steps` and the checkpoint cadence count optimiser steps. At most batch_size.",
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="Forward-pass precision. auto: bf16 autocast on a CUDA GPU that supports it, "
        "fp32 on CPU; bf16: autocast everywhere (CPU autocast on CPU — slower than fp32 on CPUs "
        "without bf16 units; refused on a GPU without bf16); fp32: never. Weights, gradients, "
        "optimiser state, Fisher and EWC stay fp32.",
    )
    compile: bool = Field(
        False,
        description="Run the training forward through torch.compile (the first steps pay the "
        "compilation, seconds to minutes; needs a C compiler on CPU). A compilation that "
        "fails falls back to the plain model with a logged warning.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="hf / hf-causal-lm: recompute the transformer's activations in the backward "
        "pass instead of keeping them (less memory, ≈ one more forward per step); same losses "
        "and gradients. Ignored, with a warning, by models without it.",
    )
    sync_every: int = Field(
        0,
        ge=0,
        description="Read the step losses and gradient norms back from the device every this "
        "many steps (0: auto, 1 on CPU, 16 on a GPU). The divergence abort (NaN loss, exploding "
        "gradient) names the step it happened at, but with N > 1 up to N − 1 later steps may "
        "have been applied to the challenger before it stops (it is discarded either way).",
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="constant: `lr` for every step (after the warm-up); cosine: linear warm-up, "
        "then a half cosine from `lr` down to `min_lr_ratio` × `lr` at the last step, every run "
        "anew (an update re-warms and re-decays). Unset: constant, or cosine for model.family "
        "hf-causal-lm (docs/CAUSAL_LM.md).",
    )
    warmup_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of the run's steps spent warming the learning rate up linearly from "
        "~0 to `lr` (a fresh AdamW's first moment estimates are noisy). Unset: 0, or 0.05 for "
        "model.family hf-causal-lm.",
    )
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="The cosine schedule's floor as a share of `lr`."
    )

    @model_validator(mode="after")
    def _micro_batches_fit(self) -> TrainConfig:
        if self.grad_accum_steps > self.batch_size:
            raise ValueError(
                f"grad_accum_steps ({self.grad_accum_steps}) must be <= batch_size "
                f"({self.batch_size}): each micro-batch needs at least one row"
            )
        return self


LAMBDA_GRID = [0.0, 1.0, 10.0, 100.0]


class BootstrapConfig(StrictModel):
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=600))


class _DistillFields(StrictModel):
    """Distillation from the previous champion (causal LMs only; `continual.distillation`)."""

    distill_weight: float = Field(
        0.0,
        ge=0,
        description="hf-causal-lm only: loss = next-token loss + this × the per-token KL "
        "divergence to the frozen champion's next-token distribution on the same batch "
        "(padding masked), which keeps the update's predictions near the champion's on old "
        "and new text alike. 0 = off.",
    )
    distill_temperature: float = Field(
        2.0,
        gt=0,
        description="Softmax temperature T of both distributions in the distillation term "
        "(scaled by T² so its gradient keeps its size as T changes).",
    )


class _EWCSection(_DistillFields):
    ewc_lambda: float | Literal["auto"] = Field(
        "auto",
        description="EWC strength on the Fisher normalised to mean 1 (applied as a proximal step "
        "after each optimiser step), or 'auto': train one challenger per value of `lambda_grid` "
        "and keep the best on the select rows (recorded on the version).",
    )
    lambda_grid: list[float] = Field(
        default_factory=lambda: list(LAMBDA_GRID), min_length=1, description="Candidates of 'auto'."
    )
    fisher_decay: float = Field(0.9, ge=0, le=1, description="Online EWC: F = γ·F_old + F_own.")
    step_grid: list[float] = Field(
        default_factory=lambda: [1.0],
        min_length=1,
        description="Shares of the run's step count (`train.steps` / `train.epochs`) at which "
        "each λ's challenger is scored on the select rows: training runs to the largest share "
        "and the best (λ, share) is kept — early stopping on the select rows. [1] (default): "
        "exactly the step count. [1, 2] pays twice the training for a choice that a few dozen "
        "select rows could not make reliably on the validation families (docs/CONTRACTS.md, "
        '"Step counts"); with hundreds of select rows per batch it can.',
    )

    @field_validator("ewc_lambda")
    @classmethod
    def _non_negative(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and value < 0:
            raise ValueError("ewc_lambda must be >= 0 or 'auto'")
        return value

    @field_validator("lambda_grid")
    @classmethod
    def _grid_non_negative(cls, value: list[float]) -> list[float]:
        if any(v < 0 for v in value):
            raise ValueError("lambda_grid values must be >= 0")
        return value

    @field_validator("step_grid")
    @classmethod
    def _shares_positive(cls, value: list[float]) -> list[float]:
        if any(not v > 0 for v in value):
            raise ValueError("step_grid shares must be > 0 (1 = the run's step count)")
        return sorted(set(value))


class MonthlyConfig(_EWCSection):
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=400, epochs=5, lr=1e-3))
    replay_ratio: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="Share of each step replayed from the data memory. EWC alone cannot learn "
        "classes that arrive later without overwriting the old ones (class-incremental); "
        "rehearsal can. 0 = EWC alone, the textbook monthly recipe.",
    )


class WeeklyConfig(_EWCSection):
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=300, epochs=5, lr=1e-3))
    replay_ratio: float = Field(
        0.75,
        ge=0,
        lt=1,
        description="Share of each step drawn from the data memory's buffer (which holds every "
        "accepted batch, this one included): close to joint training when the buffer holds all.",
    )


class DailyConfig(_DistillFields):
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=150, lr=3e-3))
    lora_r: int = Field(
        32,
        gt=0,
        description="Rank of the daily adapter. Unset: 32, or 8 for model.family hf / "
        "hf-causal-lm (evergreen/config_families.py says why).",
    )
    lora_alpha: int = Field(
        64,
        gt=0,
        description="LoRA scale numerator (update scaled by alpha / r). Unset: 2 × lora_r.",
    )
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        None, min_length=1, description="None: q_proj/v_proj where present."
    )
    replay_ratio: float = Field(
        0.75, ge=0, lt=1, description="Share of each step drawn from the data memory's buffer."
    )


class StreamConfig(StrictModel):
    ema_decay: float = Field(0.99, gt=0, lt=1)
    ph_delta: float = Field(
        0.05, ge=0, description="Page-Hinkley δ: loss drift tolerated per sample (loss units)."
    )
    ph_threshold: float | None = Field(
        None, gt=0, description="Fixed h for every epoch (no guarantee); None: calibrated."
    )
    ph_min_samples: int = Field(30, gt=0)
    false_alarm_rate: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="Probability that a stable stream ever raises a false alarm over a champion's "
        "whole monitored life (spent over doubling epochs).",
    )
    window: int = Field(
        1000,
        gt=0,
        description="Samples in the monitor's first epoch; epoch k lasts window·2^k samples and "
        "restarts the detector with its own calibrated threshold.",
    )
    micro_batch: int = Field(16, gt=0)
    lr: float = Field(1e-3, gt=0)


class ConsolidateConfig(StrictModel):
    mode: Literal["ema", "interpolate"] = "ema"
    decay: float = Field(0.5, gt=0, lt=1, description="EMA decay over the lineage (old weight).")
    alpha: float = Field(0.5, ge=0, le=1, description="Interpolation weight of the champion.")
    lineage: int = Field(3, ge=2, description="How many recent champions to consolidate.")


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
