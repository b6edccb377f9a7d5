"""Weekly and monthly: a challenger fine-tuned with online EWC (+ replay of the data memory),
λ calibrated on the select rows when set to "auto", its Fisher consolidated on this version's
rows (F ← γ·F_old + F_own) so the next update is anchored with it."""

from __future__ import annotations

import copy
import dataclasses

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from continual.ewc import EWC
from continual.training import TrainResult
from evergreen.config import EvergreenConfig
from tasks.memory import DataMemory
from tasks.state import ModelState, parameters_of
from tasks.train import (
    champion_distiller,
    fisher_kind,
    fisher_rows,
    fit_model,
    follow_data_scale,
    learned_fields,
    learning_rows,
    log_info,
    resume_key,
    selection_rows,
    settings_from,
    start_update,
    training_facts,
)
from tasks.validate import PreparedData

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
    replay_ratio: float,
) -> tuple[ModelState, dict[str, float]]:
    """Fine-tune with online EWC (+ replay); λ chosen on the select rows when set to "auto"."""
    section = getattr(cfg, section_name)
    X, y = learning_rows(cfg, champion, data, memory)
    settings = settings_from(section.train, len(X))
    buffer = memory.buffer if replay_ratio > 0 else None
    grid = section.lambda_grid if section.ewc_lambda == "auto" else [float(section.ewc_lambda)]
    selection = selection_rows(cfg, champion, memory)
    base = follow_data_scale(champion, X, memory)
    start = start_update(base, X, y, buffer)
    # EWC anchors where the update starts: for a text model that is the champion's encoder with
    # the head the probe just re-fitted on new + replayed rows. Anchored at the champion's old
    # head instead, the head's Fisher (hundreds of times the average weight's) pulls it back to
    # a head that never saw the new classes, undoing the probe: the new topic was never learned.
    anchor = dataclasses.replace(base, model=start)
    distiller = champion_distiller(section, champion)
    best: _Calibrated | None = None
    scores: dict[str, float] = {}
    seconds = 0.0
    for lam in grid:
        model = copy.deepcopy(start)
        ewc = _anchored_ewc(cfg, anchor, memory, lam, section.fisher_decay)
        result, own = fit_model(
            model,
            X,
            y,
            settings,
            f"{label} λ={lam:g}",
            cfg=cfg,
            processes=section.train.processes,
            fisher_kind=None if ewc is None else ewc.kind,
            resume=resume_key(section_name, champion, data, memory),
            ewc=ewc,
            replay=buffer,
            replay_ratio=replay_ratio,
            distiller=distiller,
        )
        seconds += result.seconds
        score = selection.score(model) if len(grid) > 1 else float("nan")
        scores[f"calibration.lambda_{lam:g}"] = score
        if best is None or score > best[1]:
            best = (lam, score, model, ewc, result, own)
    assert best is not None
    lam, score, model, ewc, kept, own = best
    if len(grid) > 1:
        get_run_logger().info("λ calibration on select rows: %s → λ=%g", scores, lam)
    # own Fisher on this version's data (from the ranks when distributed); F ← γ·F_old + F_own
    fisher_metrics: dict[str, float] = {}
    if ewc is not None:
        ewc.consolidate(model, *fisher_rows(champion.spec, X, y), own=own)
        fisher_metrics = _log_fisher(ewc, section_name)
    state = ModelState(
        model=model,
        spec=base.spec,
        ewc=ewc,
        references=dict(champion.references),
        training=training_facts(
            cfg,
            section_name,
            settings,
            kept,
            rows=len(X),
            seconds=seconds,
            chosen={"ewc": {"lambda": lam}, "replay_ratio": replay_ratio},
        ),
        **learned_fields(memory),
    )
    return state, {"ewc.lambda": lam, **fisher_metrics, **scores}


@task(cache_policy=NO_CACHE, timeout_seconds=3600)
def train_finetune_ewc(
    cfg: EvergreenConfig, champion: ModelState, data: PreparedData, memory: DataMemory
) -> tuple[ModelState, dict[str, float]]:
    """Monthly: full fine-tune of every weight with the online-EWC penalty (+ rehearsal of the
    data memory at `monthly.replay_ratio`)."""
    m = cfg.monthly
    return _ewc_challenger(cfg, champion, data, memory, "monthly", "finetune", m.replay_ratio)


@task(cache_policy=NO_CACHE, timeout_seconds=3600)
def train_replay_ewc(
    cfg: EvergreenConfig, champion: ModelState, data: PreparedData, memory: DataMemory
) -> tuple[ModelState, dict[str, float]]:
    """Weekly: experience replay from the data memory mixed into each step, plus EWC."""
    w = cfg.weekly
    return _ewc_challenger(cfg, champion, data, memory, "weekly", "replay", w.replay_ratio)


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
