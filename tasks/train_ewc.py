"""Weekly and monthly: a challenger fine-tuned with online EWC (+ replay of the data memory),
λ and the step count chosen on the select rows (`ewc_lambda: auto`, `step_grid`), its Fisher
consolidated on this version's rows (F ← γ·F_old + F_own) so the next update is anchored with
it."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from continual.ewc import EWC
from continual.models import ModelSpec
from continual.training import TrainResult, TrainSettings, load_trainable_, trainable_copy
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


@dataclasses.dataclass(frozen=True)
class _Calibrated:
    """The kept candidate of one λ: its select score, the step it was kept at, the model (its
    parameters those of that step), EWC state, training and own Fisher."""

    lam: float
    score: float
    step: int
    model: torch.nn.Module
    ewc: EWC
    result: TrainResult
    own: dict[str, torch.Tensor] | None


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
    settings, scored_steps = step_plan(update.settings, section.step_grid)
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
            settings,
            f"{label} λ={lam:g}",
            cfg=cfg,
            processes=section.train.processes,
            fisher_kind=None if ewc is None else ewc.kind,
            resume=resume_key(section_name, champion, data, memory),
            ewc=ewc,
            replay=update.buffer,
            replay_ratio=section.replay_ratio,
            distiller=update.distiller,
            snapshot_at=scored_steps[:-1],
        )
        return model, ewc, result, own

    best, scores, seconds = _calibrate(grid, scored_steps, fit_at, update.selection)
    if len(scores) > 1:
        get_run_logger().info(
            "calibration on select rows: %s → λ=%g at step %d of %d",
            scores,
            best.lam,
            best.step,
            scored_steps[-1],
        )
    rows = (update.X, update.y)
    fisher_metrics = _consolidate(best.ewc, best.model, best.own, champion.spec, rows, section_name)
    state = _ewc_version(cfg, champion, memory, update, section_name, best, seconds)
    metrics = {"ewc.lambda": best.lam, "train.kept_step": float(best.step)}
    return state, {**metrics, **fisher_metrics, **scores}


def step_plan(settings: TrainSettings, shares: list[float]) -> tuple[TrainSettings, list[int]]:
    """The run stretched to the largest share of its step count, and the steps scored (each
    share × steps, at least 1, ascending); the warm-up keeps its share of the run."""
    steps = sorted({max(1, round(share * settings.steps)) for share in shares})
    warmup = min(round(settings.warmup_steps * steps[-1] / settings.steps), steps[-1] - 1)
    return dataclasses.replace(settings, steps=steps[-1], warmup_steps=warmup), steps


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
    section = getattr(cfg, section_name)
    return ModelState(
        model=kept.model,
        spec=update.base.spec,
        ewc=kept.ewc,
        references=dict(champion.references),
        training=training_facts(
            cfg,
            section_name,
            dataclasses.replace(update.settings, steps=kept.result.steps),
            kept.result,
            rows=len(update.X),
            seconds=seconds,
            chosen={
                "ewc": {"lambda": kept.lam},
                "replay_ratio": section.replay_ratio,
                "kept_step": kept.step,
            },
        ),
        **learned_fields(memory),
    )


def _calibrate(
    grid: list[float],
    scored_steps: list[int],
    fit_at: Callable[[float], _Fitted],
    selection: Selection,
) -> tuple[_Calibrated, dict[str, float], float]:
    """Fit one challenger per λ of the grid, score it at each of `scored_steps` on the select
    rows and keep the best (λ, step): the first of equals, so the smaller λ and the shorter run
    win ties; a single candidate is not scored. Returns the kept one, each candidate's score as
    a run metric, and the training seconds of the whole grid."""
    best: _Calibrated | None = None
    scores: dict[str, float] = {}
    seconds = 0.0
    single = len(grid) == 1 and len(scored_steps) == 1
    for lam in grid:
        model, ewc, result, own = fit_at(lam)
        seconds += result.seconds
        step, score, by_step = _best_step(model, result, scored_steps, selection, single)
        for at, value in by_step.items():
            name = f"calibration.lambda_{lam:g}"
            scores[name if len(scored_steps) == 1 else f"{name}.step_{at}"] = value
        if best is None or score > best.score:
            best = _Calibrated(lam, score, step, model, ewc, result, own)
    assert best is not None
    return best, scores, seconds


def _best_step(
    model: torch.nn.Module,
    result: TrainResult,
    scored_steps: list[int],
    selection: Selection,
    single: bool,
) -> tuple[int, float, dict[int, float]]:
    """Score the run's snapshots and its last step on the select rows and leave `model` at the
    best of them (the earliest of equals); returns that step, its score and every scored
    step's score. A step whose snapshot a resumed run lacks is not a candidate."""
    last = scored_steps[-1]
    if single:
        return last, float("nan"), {last: float("nan")}
    earlier = [(at, result.snapshots[at]) for at in scored_steps[:-1] if at in result.snapshots]
    if not earlier:  # one step to score (the default grid): no copy, nothing to load back
        score = selection.score(model)
        return last, score, {last: score}
    candidates = [*earlier, (last, trainable_copy(model))]
    best_step, best_score = last, float("-inf")
    scored: dict[int, float] = {}
    for at, parameters in candidates:
        load_trainable_(model, parameters)
        scored[at] = selection.score(model)
        if scored[at] > best_score:
            best_step, best_score = at, scored[at]
    load_trainable_(model, dict(candidates)[best_step])
    result.snapshots.clear()  # the kept parameters are in the model; free the copies
    return best_step, best_score, scored


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
