"""The model and one training run: `model:` (which network is trained) and the `train:` block
that every training cadence's section holds (steps, optimiser, processes, checkpoints,
precision, learning-rate schedule). Each cadence's own knobs are in `evergreen.config_cadences`;
`evergreen.config` re-exports these names.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, field_validator, model_validator

from evergreen.config_base import StrictModel

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
