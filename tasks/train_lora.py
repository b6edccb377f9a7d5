"""Daily: a LoRA adapter on the batch, screened on the select rows before the promotion gate;
a kept adapter's version carries the champion's EWC state re-anchored at the folded weights,
consolidated only where the adapter changed something."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import TYPE_CHECKING, cast

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from continual.causal_lm import has_next_token
from continual.ewc import EWC
from continual.fisher import diagonal_fisher
from continual.gate_policy import GateDecision
from continual.gating import decide, format_difference
from continual.inference import row_scores
from continual.models import CAUSAL_LM, TEXT_FAMILIES
from continual.training import TrainResult
from evergreen.config import DailyConfig, EvergreenConfig
from tasks.evaluate import gate_policy
from tasks.memory import DataMemory
from tasks.state import ModelState, make_trainable, parameters_of
from tasks.train import fisher_rows, fit_model, learned_fields, resume_key, training_facts
from tasks.train_start import Selection, UpdateStart, prepare_update
from tasks.validate import PreparedData

if TYPE_CHECKING:
    from peft import PeftModel

    from continual.lora import LoraSettings


@task(cache_policy=NO_CACHE, timeout_seconds=3600)
def train_lora_gated(
    cfg: EvergreenConfig, champion: ModelState, data: PreparedData, memory: DataMemory
) -> tuple[ModelState | None, GateDecision]:
    """Daily: a LoRA adapter on the batch, screened on the select rows before the gate.

    The adapter starts at zero (it predicts like the champion, up to a text model's refitted
    head), so "before vs after" is "champion vs adapted" and the keep/discard check is
    `decide()` itself — non-inferiority on the select rows of every batch — never a raw
    difference, never on the gate's rows; when those rows are too few to decide, the check
    defers to the promotion gate (`screened`). Returns (state or None, the check's decision).
    """
    from continual.lora import attach_lora, gated_update  # peft: only when used

    d = cfg.daily
    lora = _lora_settings(d)
    # A text model's head is fitted first (it is not part of the adapter; see start_update).
    update = prepare_update(cfg, champion, data, memory, d)
    peft_model = attach_lora(update.start, lora)
    verdict: dict[str, GateDecision] = {}
    trained: list[TrainResult] = []

    def fit_adapter(m: torch.nn.Module) -> TrainResult:
        result, _ = fit_model(
            m,
            update.X,
            update.y,
            update.settings,
            "lora",
            cfg=cfg,
            processes=d.train.processes,
            resume=resume_key("daily", champion, data, memory),
            replay=update.buffer,
            replay_ratio=d.replay_ratio,
            distiller=update.distiller,
        )
        trained.append(result)
        return result

    def keep(candidate: torch.nn.Module) -> bool:
        decision = _selection_decision(cfg, champion, update.selection, candidate)
        verdict["decision"] = decision
        get_run_logger().info("select-row check: %s", " ".join(decision.reasons))
        return decision.promote

    if not gated_update(peft_model, fit_adapter, keep).accepted:
        return None, verdict["decision"]
    state = _lora_version(cfg, champion, memory, update, peft_model, trained[-1])
    return state, verdict["decision"]


def _lora_settings(daily: DailyConfig) -> LoraSettings:
    """The adapter's shape, from the `daily` section."""
    from continual.lora import LoraSettings  # peft: only when used

    return LoraSettings(
        r=daily.lora_r,
        alpha=daily.lora_alpha,
        dropout=daily.lora_dropout,
        target_modules=daily.target_modules,
        seed=daily.train.seed,
    )


def _lora_version(
    cfg: EvergreenConfig,
    champion: ModelState,
    memory: DataMemory,
    update: UpdateStart,
    peft_model: torch.nn.Module,
    result: TrainResult,
) -> ModelState:
    """A kept adapter as a version. The version keeps the adapter separate (base weights +
    adapter/); loading merges it. Its EWC state is the champion's, re-anchored at the folded
    weights (`_adapted_ewc`)."""
    X, y = update.X, update.y
    return ModelState(
        model=peft_model,
        spec=update.base.spec,
        ewc=_adapted_ewc(update.base, peft_model, X, y),
        references=dict(champion.references),
        training=training_facts(
            cfg,
            "daily",
            update.settings,
            result,
            rows=len(X),
            chosen={"lora": _lora_params(peft_model)},
        ),
        **learned_fields(memory),
    )


def _lora_params(peft_model: torch.nn.Module) -> dict[str, object]:
    """The adapter as peft resolved it (target modules named in full, not the config's None)."""
    config = next(iter(getattr(peft_model, "peft_config", {}).values()), None)
    if config is None:
        return {}
    return {
        "r": config.r,
        "alpha": config.lora_alpha,
        "target_modules": sorted(config.target_modules or []),
    }


def _adapted_ewc(
    champion: ModelState, peft_model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor
) -> EWC | None:
    """The online EWC state after a LoRA update, anchored at the folded weights.

    A LoRA update changes only its target weights (folded: W + (α/r)·B·A) and, for a text
    classifier, the refitted head. Its own Fisher is estimated on exactly those parameters (so
    a later merge weighs this version by its own data where it changed something, and by
    nothing elsewhere), and only there does the accumulator consolidate (γ·F_old + F_own);
    everywhere else it stays the champion's, so a version stored against its parent stores
    those entries by reference (`tasks.state.write_state`). The next weekly or monthly update
    estimates the Fisher of every trainable parameter again (docs/TEXT.md, "The EWC state of a
    LoRA version"). Tabular families (small Fisher, never stored against a parent) consolidate
    every parameter, as before."""
    from continual.lora import merge_adapter

    if champion.ewc is None:
        return None
    folded = make_trainable(merge_adapter(cast("PeftModel", copy.deepcopy(peft_model))))
    ewc = EWC(
        champion.ewc.fisher,
        parameters_of(folded),
        lam=champion.ewc.lam,
        gamma=champion.ewc.gamma,
        kind=champion.ewc.kind,
    )
    rows = fisher_rows(champion.spec, X, y)
    if champion.spec.family not in TEXT_FAMILIES:  # small: every parameter, as before
        ewc.consolidate(folded, *rows)
        return ewc
    changed = changed_parameters(champion.model, folded)
    own: dict[str, torch.Tensor] = {}
    if changed:
        for name, p in folded.named_parameters():
            p.requires_grad_(name in changed)
        own = diagonal_fisher(folded, *rows, kind=ewc.kind)
    ewc.consolidate(folded, *rows, own=own, untouched="keep")
    return ewc


def changed_parameters(before: torch.nn.Module, after: torch.nn.Module) -> set[str]:
    """Trainable parameters of `after` whose values differ from `before`'s (bit for bit)."""
    old = dict(before.named_parameters())
    return {
        name
        for name, p in after.named_parameters()
        if p.requires_grad
        and (
            name not in old
            or old[name].shape != p.shape
            or not torch.equal(old[name].detach().to(p.device, p.dtype), p.detach())
        )
    }


def _selection_decision(
    cfg: EvergreenConfig, champion: ModelState, selection: Selection, candidate: torch.nn.Module
) -> GateDecision:
    """The gate's rule on the select rows of every batch, pooled: is the adapted model shown
    not worse than the champion on held-out data it was not trained on? (Pooling gives the
    check enough rows to decide on small daily batches; the promotion gate then checks new
    and retention rows separately, on its own rows.) A causal LM's rows of fewer than 2 tokens
    are left out, as the gate leaves them out (`tasks.evaluate`)."""
    parts = [part for part in (selection.new, selection.old) if part is not None]
    if not parts:
        raise ValueError("no select rows to judge the update on: raise data.select_fraction")
    X = torch.cat([X for X, _ in parts])
    y = torch.cat([y for _, y in parts])
    if champion.spec.family == CAUSAL_LM:  # rows with no token to predict carry no evidence
        scorable = torch.from_numpy(has_next_token(champion.model, X))
        X, y = X[scorable], y[scorable]
        if not len(X):
            raise ValueError("no select row has two tokens or more: raise data.select_fraction")
    return screened(
        decide(
            challenger_new_correct=row_scores(candidate, X, y),
            champion_new_correct=row_scores(champion.model, X, y),
            policy=gate_policy(cfg),
        )
    )


def screened(check: GateDecision) -> GateDecision:
    """The select-row check as a screen in front of the gate: an inconclusive check defers.

    A daily batch leaves a few dozen pooled select rows (MDE 20-40 pts against the 5-pt
    tolerance), where `decide()`'s non-inferiority rule fails nearly every adapter, good ones
    included, for want of evidence — the evidence the promotion gate then looks for on its own,
    larger set of rows with the same rule. So the check's verdict stands when it passes or
    when the check is powered; an underpowered failure keeps the adapter if it scored no worse
    than the champion on the select rows (difference ≥ 0) and discards it otherwise. The gate's
    error rates do not move: it tests one candidate on rows nothing was chosen on, and a screen
    only decides how often it is asked. Measured in docs/TEXT.md ("The select-row check as a
    screen") and README ("Design decisions", Daily LoRA)."""
    test = check.new_data
    if check.promote or not check.underpowered or test is None:
        return check
    change = format_difference(test.diff, binary=test.on_correctness)
    if test.diff < 0:
        note = f"The adapter scored {change} on the select rows: discarded."
        return replace(check, reasons=(*check.reasons, note))
    note = (
        f"The select rows cannot decide and the adapter scored {change} on them: kept, "
        "the promotion gate decides on its own rows."
    )
    return replace(check, promote=True, reasons=(*check.reasons, note))
