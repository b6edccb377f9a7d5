"""Weekly and monthly: a challenger fine-tuned with online EWC (+ replay of the data memory),
λ calibrated on the select rows when set to "auto", its Fisher consolidated on this version's
rows (F ← γ·F_old + F_own) so the next update is anchored with it."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from continual.ewc import EWC
from continual.models import ModelSpec
from continual.training import TrainResult
from evergreen.config import EvergreenConfig
from tasks.memory import DataMemory
from tasks.state import ModelState, parameters_of
from tasks.train import (
    fisher_kind,
    fisher_rows,
    fit_model,
    learned_fields,
    log_info,
    resume_key,
    training_facts,
)
from tasks.train_start import Selection, UpdateStart, prepare_update
from tasks.validate import PreparedData

# one λ's fit: (model, its EWC state, training, own Fisher from the ranks when distributed)
_Fitted = tuple[torch.nn.Module, EWC, TrainResult, dict[str, torch.Tensor] | None]
# one λ of the calibration grid: (λ, select score, model, its EWC state, training, own Fisher)
_Calibrated = tuple[float, float, torch.nn.Module, EWC, TrainResult, dict[str, torch.Tensor] | None]


def _anchored_ewc(
    cfg: EvergreenConfig, champion: ModelState, memory: DataMemory, lam: float, gamma: float
) -> EWC:
    """Online EWC anchored at the current champion; its Fisher from the champion's state or, for
    a champion without one, from training rows in the replay buffer (never held-out rows)."""
    if champion.ewc is not None:
        return EWC(
            champion.ewc.fisher,
            parameters_of(champion.model),
            lam=lam,
            gamma=gamma,
            own_fisher=champion.ewc.own_fisher,
            kind=champion.ewc.kind,
        )
    if memory.buffer is None or len(memory.buffer) == 0:
        raise ValueError(f"champion v{champion.version} has no Fisher and the memory no rows")
    X, y, _ = memory.buffer.tensors()
    spec = champion.spec
    return EWC.from_model(
        champion.model, *fisher_rows(spec, X, y), lam=lam, gamma=gamma, kind=fisher_kind(spec)
    )


def _ewc_challenger(
    cfg: EvergreenConfig,
    champion: ModelState,
    data: PreparedData,
    memory: DataMemory,
    section_name: str,
    label: str,
) -> tuple[ModelState, dict[str, float]]:
    """Fine-tune with online EWC (+ replay at the section's `replay_ratio`); λ chosen on the
    select rows when set to "auto"."""
    section = getattr(cfg, section_name)
    update = prepare_update(cfg, champion, data, memory, section)
    grid = section.lambda_grid if section.ewc_lambda == "auto" else [float(section.ewc_lambda)]
    # EWC anchors where the update starts: for a text model that is the champion's encoder with
    # the head the probe just re-fitted on new + replayed rows. Anchored at the champion's old
    # head instead, the head's Fisher (hundreds of times the average weight's) pulls it back to
    # a head that never saw the new classes, undoing the probe: the new topic was never learned.
    anchor = dataclasses.replace(update.base, model=update.start)

    def fit_at(lam: float) -> _Fitted:
        model = copy.deepcopy(update.start)
        ewc = _anchored_ewc(cfg, anchor, memory, lam, section.fisher_decay)
        result, own = fit_model(
            model,
            update.X,
            update.y,
            update.settings,
            f"{label} λ={lam:g}",
            cfg=cfg,
            processes=section.train.processes,
            fisher_kind=None if ewc is None else ewc.kind,
            resume=resume_key(section_name, champion, data, memory),
            ewc=ewc,
            replay=update.buffer,
            replay_ratio=section.replay_ratio,
            distiller=update.distiller,
        )
        return model, ewc, result, own

    best, scores, seconds = _calibrate_lambda(grid, fit_at, update.selection)
    lam, _score, model, ewc, _result, own = best
    if len(grid) > 1:
        get_run_logger().info("λ calibration on select rows: %s → λ=%g", scores, lam)
    rows = (update.X, update.y)
    fisher_metrics = _consolidate(ewc, model, own, champion.spec, rows, section_name)
    state = _ewc_version(cfg, champion, memory, update, section_name, best, seconds)
    return state, {"ewc.lambda": lam, **fisher_metrics, **scores}


def _ewc_version(
    cfg: EvergreenConfig,
    champion: ModelState,
    memory: DataMemory,
    update: UpdateStart,
    section_name: str,
    kept: _Calibrated,
    seconds: float,
) -> ModelState:
    """The kept λ's challenger as a version; its training facts count the whole grid's time."""
    lam, _score, model, ewc, result, _own = kept
    section = getattr(cfg, section_name)
    return ModelState(
        model=model,
        spec=update.base.spec,
        ewc=ewc,
        references=dict(champion.references),
        training=training_facts(
            cfg,
            section_name,
            update.settings,
            result,
            rows=len(update.X),
            seconds=seconds,
            chosen={"ewc": {"lambda": lam}, "replay_ratio": section.replay_ratio},
        ),
        **learned_fields(memory),
    )


def _calibrate_lambda(
    grid: list[float], fit_at: Callable[[float], _Fitted], selection: Selection
) -> tuple[_Calibrated, dict[str, float], float]:
    """Fit one challenger per λ of the grid and keep the best on the select rows (the first of
    equals; a grid of one λ is not scored). Returns the kept one, each λ's score as a run
    metric, and the training seconds of the whole grid."""
    best: _Calibrated | None = None
    scores: dict[str, float] = {}
    seconds = 0.0
    for lam in grid:
        model, ewc, result, own = fit_at(lam)
        seconds += result.seconds
        score = selection.score(model) if len(grid) > 1 else float("nan")
        scores[f"calibration.lambda_{lam:g}"] = score
        if best is None or score > best[1]:
            best = (lam, score, model, ewc, result, own)
    assert best is not None
    return best, scores, seconds


def _consolidate(
    ewc: EWC | None,
    model: torch.nn.Module,
    own: dict[str, torch.Tensor] | None,
    spec: ModelSpec,
    rows: tuple[torch.Tensor, torch.Tensor],
    cadence: str,
) -> dict[str, float]:
    """Fold the kept model's own Fisher on this version's data (from the ranks when distributed)
    into the accumulator, F ← γ·F_old + F_own, so the next update is anchored with it; returns
    the Fisher's figures as run metrics."""
    if ewc is None:
        return {}
    ewc.consolidate(model, *fisher_rows(spec, *rows), own=own)
    return _log_fisher(ewc, cadence)


@task(cache_policy=NO_CACHE, timeout_seconds=3600)
def train_finetune_ewc(
    cfg: EvergreenConfig, champion: ModelState, data: PreparedData, memory: DataMemory
) -> tuple[ModelState, dict[str, float]]:
    """Monthly: full fine-tune of every weight with the online-EWC penalty (+ rehearsal of the
    data memory at `monthly.replay_ratio`)."""
    return _ewc_challenger(cfg, champion, data, memory, "monthly", "finetune")


@task(cache_policy=NO_CACHE, timeout_seconds=3600)
def train_replay_ewc(
    cfg: EvergreenConfig, champion: ModelState, data: PreparedData, memory: DataMemory
) -> tuple[ModelState, dict[str, float]]:
    """Weekly: experience replay from the data memory mixed into each step, plus EWC."""
    return _ewc_challenger(cfg, champion, data, memory, "weekly", "replay")


def _log_fisher(ewc: EWC, cadence: str) -> dict[str, float]:
    """Log the Fisher a version carries (its own, on this version's rows, and the accumulated
    one the next update is anchored with); the same figures as run metrics."""
    own = ewc.own_fisher or {}
    metrics = {
        "ewc.fisher_entries": float(sum(t.numel() for t in ewc.fisher.values())),
        "ewc.own_fisher_mean": _mean(own),
        "ewc.fisher_mean": _mean(ewc.fisher),
    }
    log_info(
        "%s EWC Fisher (%s): %d tensors, %d entries; own mean %.3g, accumulated mean %.3g",
        cadence,
        ewc.kind,
        len(ewc.fisher),
        int(metrics["ewc.fisher_entries"]),
        metrics["ewc.own_fisher_mean"],
        metrics["ewc.fisher_mean"],
    )
    return metrics


def _mean(tensors: dict[str, torch.Tensor]) -> float:
    count = sum(t.numel() for t in tensors.values())
    return sum(float(t.double().sum()) for t in tensors.values()) / count if count else 0.0
