"""What every training task shares: the optimiser settings, the training loop run under the
pipeline's slot (`fit_model`), the recorded training facts, and the Fisher's rows and kind.

The tasks themselves live by method: `tasks.train_bootstrap` (the first champion),
`tasks.train_ewc` (weekly and monthly: online EWC + replay, λ calibrated) and `tasks.train_lora`
(daily: the gated LoRA adapter); what an update of a champion starts from is
`tasks.train_start`; the algorithms live in `continual`.

Every challenger learns the run's accepted training rows, replays the data memory (rows of every
accepted batch, rejected updates' included), and records what it learned (`learned`, the memory
snapshot). Selection — λ calibration and the LoRA keep/discard check — uses the *select* rows
only; the promotion gate's rows are never looked at here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from prefect import get_run_logger

from continual.distributed import DistributedJob
from continual.fisher_kinds import FisherKind
from continual.models import CAUSAL_LM, TEXT_FAMILIES, ModelSpec
from continual.training import TrainResult, TrainSettings, train
from evergreen.config import (
    EvergreenConfig,
    TrainConfig,
)
from model_registry.run_record import flatten_params
from tasks.distributed import run_distributed
from tasks.limits import training_slot
from tasks.memory import DataMemory
from tasks.progress import step_progress
from tasks.resume import ResumeKey, checkpointing_for
from tasks.run_log import run_logger
from tasks.state import ModelState, TrainingFacts
from tasks.validate import PreparedData


def settings_from(config: TrainConfig, n_rows: int) -> TrainSettings:
    """Optimiser settings; `steps` is at least `config.epochs` passes over `n_rows`, and the
    warm-up is `config.warmup_fraction` of them."""
    epochs = math.ceil(config.epochs * n_rows / config.batch_size) if config.epochs else 0
    steps = max(config.steps, epochs)
    return TrainSettings(
        steps=steps,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        seed=config.seed,
        grad_accum_steps=config.grad_accum_steps,
        precision=config.precision,
        compile=config.compile,
        gradient_checkpointing=config.gradient_checkpointing,
        sync_every=config.sync_every,
        lr_schedule=config.lr_schedule,
        warmup_steps=min(round(config.warmup_fraction * steps), steps - 1),
        min_lr_ratio=config.min_lr_ratio,
    )


def fit_model(
    model: torch.nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    settings: TrainSettings,
    label: str,
    *,
    cfg: EvergreenConfig,
    processes: int = 1,
    fisher_kind: FisherKind | None = None,
    resume: ResumeKey | None = None,
    **methods: Any,
) -> tuple[TrainResult, dict[str, torch.Tensor] | None]:
    """Run the training loop holding the pipeline's training slot, with a progress bar; with
    more than one process, under torchrun (`tasks.distributed`), which also returns the trained
    model's Fisher on (X, y) when `fisher_kind` is set (all-reduced over the ranks' shards).
    With a `resume` key (one process) the loop saves its state as the section's
    `checkpoint_every_*` say and resumes a killed run's state (`tasks.resume`)."""
    fisher = None
    with training_slot(cfg.registry.name, cfg.home_path / "locks"):
        if processes > 1:
            result, fisher = _fit_distributed(
                model, X, y, settings, processes, fisher_kind, methods
            )
        else:
            checkpointing = None
            if resume is not None:
                checkpointing = checkpointing_for(
                    cfg, resume, label, model, X, y, settings, on_resumed=_announce_resume(label)
                )
            with step_progress(label, settings.steps) as on_step:
                result = train(
                    model, X, y, settings, on_step=on_step, checkpointing=checkpointing, **methods
                )
    get_run_logger().info(
        "%s: %d steps%s in %.1fs, loss %.3f → %.3f on %s",
        label,
        result.steps,
        f" ({result.steps - result.resumed_at} in this run)" if result.resumed_at else "",
        result.seconds,
        result.first_loss,
        result.last_loss,
        result.device if processes == 1 else f"{processes} processes",
    )
    return result, fisher


def _fit_distributed(
    model: torch.nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    settings: TrainSettings,
    processes: int,
    fisher_kind: FisherKind | None,
    methods: dict[str, Any],
) -> tuple[TrainResult, dict[str, torch.Tensor] | None]:
    """The loop under torchrun, its ranks' logs in the flow run's log."""
    # the config refuses distillation under torchrun: the ranks carry no teacher
    if methods.pop("distiller", None) is not None:
        raise ValueError("distillation does not run under train.processes > 1")
    if methods.pop("snapshot_at", ()):  # the ranks return the last step's weights only
        log_info("train.processes > 1 keeps no snapshot: the last step is the only candidate")
    job = DistributedJob(model, X, y, settings, fisher_kind=fisher_kind, **methods)
    outcome = run_distributed(job, processes, get_run_logger().info)
    assert outcome.result is not None
    return outcome.result, outcome.fisher


def _announce_resume(label: str) -> Callable[[int, int], None]:
    def on_resumed(step: int, total: int) -> None:
        log_info("%s: resumed at step %d of %d from its saved training state", label, step, total)

    return on_resumed


def resume_key(
    section: str, champion: ModelState | None, data: PreparedData, memory: DataMemory
) -> ResumeKey:
    """What a killed training's saved state must match to be resumed: the same section,
    champion, batch data and data memory (`tasks.resume`)."""
    return ResumeKey(
        section=section,
        champion=str(champion.version) if champion is not None else "none",
        data_hash=data.data_hash or "none",
        memory=memory.ref.run_id if memory.ref else "none",
    )


def training_facts(
    cfg: EvergreenConfig,
    section: str,
    settings: TrainSettings,
    result: TrainResult,
    *,
    rows: int,
    seconds: float | None = None,
    chosen: dict[str, Any] | None = None,
) -> TrainingFacts:
    """The effective configuration of a training (its config section, the gate policy, what
    was derived or chosen at run time) with the kept model's loss curve and timing."""
    params = flatten_params(
        {
            section: getattr(cfg, section).model_dump(mode="json"),
            "gate": cfg.gate.model_dump(mode="json"),
            "train": {
                "steps": settings.steps,
                "lr": settings.lr,
                "batch_size": settings.batch_size,
                "rows": rows,
            },
            **(chosen or {}),
        }
    )
    return TrainingFacts(
        params=params,
        losses=tuple(float(v) for v in result.losses),
        seconds=result.seconds if seconds is None else seconds,
        steps=result.steps,
        device=str(result.device),
    )


TEXT_FISHER_ROWS = 64  # rows a text model's Fisher is estimated on


def fisher_kind(spec: ModelSpec) -> FisherKind:
    """ "empirical" for a causal LM (the only kind for [N, L, V] logits: per-sequence gradients
    of the summed next-token NLL, `continual.fisher.causal_lm_targets`); "sampled" for the text
    encoder (one backward pass per row instead of one per class); else the default. Why: per-
    example gradients of a pretrained encoder's Linear layers are the costly part of a text
    update (200 rows, 4 classes, "true" kind: ~6 min on 2 CPU cores)."""
    if spec.family == CAUSAL_LM:
        return "empirical"
    return "sampled" if spec.family in TEXT_FAMILIES else "auto"


def fisher_rows(
    spec: ModelSpec, X: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows the Fisher is estimated on: all of them, or for a text model a seeded sample of
    `TEXT_FISHER_ROWS` (a diagonal Fisher is a mean; 64 rows rank parameters well enough for a
    penalty whose scale λ is calibrated anyway)."""
    if spec.family not in TEXT_FAMILIES or len(X) <= TEXT_FISHER_ROWS:
        return X, y
    keep = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))[:TEXT_FISHER_ROWS]
    return X[keep], y[keep]


def log_info(message: str, *args: object) -> None:
    """Log to the Prefect run when there is one (tasks), else to this module's logger."""
    run_logger(__name__).info(message, *args)


def learned_fields(memory: DataMemory) -> dict[str, Any]:
    """A new version's `learned` batches and memory snapshot: every batch in the data memory."""
    return {
        "learned": frozenset(memory.batches),
        "memory_run": memory.ref.run_id if memory.ref else None,
    }
