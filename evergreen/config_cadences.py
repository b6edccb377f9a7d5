"""Each cadence's own section of `evergreen.yaml` (`bootstrap`, `monthly`, `weekly`, `daily`,
`stream`, `consolidate`: `evergreen.cadences` names which cadence reads which): its `train`
block and the knobs of its method — EWC's λ and Fisher, replay, the daily LoRA adapter,
distillation from the champion, the stream monitor, the lineage merge.

The rules that span sections (a family's defaults, distillation, the replay mix) are in
`evergreen.config_families`; `evergreen.config` re-exports these names.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from evergreen.config_base import StrictModel
from evergreen.config_training import TrainConfig

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
        '"Step counts"); batches that leave hundreds of select rows may choose better.',
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
    # 300 steps (was 150): chosen on the validation families through the product (daily LoRA,
    # seeds 0-2): rotate +0.3, scramble ±0, sensor-ageing +0.8, classes-a +0.6 pts average
    # accuracy, every family's newest task higher; lr 1e-3 lost 0.7 on average and a LoRA on the
    # classifier head too gained 0.3 (docs/CONTRACTS.md, "Step counts"). Causal LMs keep 150
    # (`config_families.CAUSAL_LM_DAILY_STEPS`).
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=300, lr=3e-3))
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
