"""Train challenger: one thin task per method; the algorithms live in `continual`.

Every challenger learns the run's accepted training rows, replays the data memory (rows of every
accepted batch, rejected updates' included), and records what it learned (`learned`, the memory
snapshot). Selection — λ calibration and the LoRA keep/discard check — uses the *select* rows
only; the promotion gate's rows are never looked at here.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from continual.distillation import TokenDistiller
from continual.distributed import DistributedJob
from continual.ewc import EWC
from continual.fisher import diagonal_fisher
from continual.fisher_kinds import FisherKind
from continual.gating import GateDecision, decide
from continual.models import (
    CAUSAL_LM,
    SPEC_ATTRIBUTE,
    TEXT_FAMILIES,
    ModelSpec,
    build_model,
    fit_standardizer,
)
from continual.probe import has_probe_head, probe_head_
from continual.replay import ReservoirBuffer as ReplayBuffer
from continual.standardization import can_follow, rescale_fisher, widen_
from continual.training import TrainResult, TrainSettings, row_scores, train
from evergreen.config import (
    DailyConfig,
    EvergreenConfig,
    MonthlyConfig,
    TrainConfig,
    WeeklyConfig,
)
from model_registry.run_record import flatten_params
from tasks.common import frame_to_tensors
from tasks.distributed import run_distributed
from tasks.evaluate import gate_policy, split_by_learned
from tasks.limits import training_slot
from tasks.memory import DataMemory
from tasks.progress import step_progress
from tasks.resume import ResumeKey, checkpointing_for
from tasks.state import ModelState, TrainingFacts, make_trainable, parameters_of
from tasks.validate import PreparedData

if TYPE_CHECKING:
    from peft import PeftModel


def settings_from(config: TrainConfig, n_rows: int) -> TrainSettings:
    """Optimiser settings; `steps` is at least `config.epochs` passes over `n_rows`."""
    epochs = math.ceil(config.epochs * n_rows / config.batch_size) if config.epochs else 0
    return TrainSettings(
        steps=max(config.steps, epochs),
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        seed=config.seed,
        grad_accum_steps=config.grad_accum_steps,
        precision=config.precision,
        compile=config.compile,
        gradient_checkpointing=config.gradient_checkpointing,
        sync_every=config.sync_every,
    )


def _fit(
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
            logger = get_run_logger()
            # the config refuses distillation under torchrun: the ranks carry no teacher
            if methods.pop("distiller", None) is not None:
                raise ValueError("distillation does not run under train.processes > 1")
            job = DistributedJob(model, X, y, settings, fisher_kind=fisher_kind, **methods)
            outcome = run_distributed(job, processes, logger.info)
            assert outcome.result is not None
            result, fisher = outcome.result, outcome.fisher
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


def _announce_resume(label: str) -> Callable[[int, int], None]:
    def on_resumed(step: int, total: int) -> None:
        _log_info("%s: resumed at step %d of %d from its saved training state", label, step, total)

    return on_resumed


def _resume_key(
    section: str, champion: ModelState | None, data: PreparedData, memory: DataMemory
) -> ResumeKey:
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


def new_spec(cfg: EvergreenConfig, train_df: pd.DataFrame) -> ModelSpec:
    """The model spec of a first champion: sizes from config, standardisation from its data."""
    if cfg.data.text:
        return text_spec(cfg)
    mean, std = fit_standardizer(train_df[cfg.data.features].to_numpy(dtype="float32"))
    m = cfg.model
    return ModelSpec(
        family=m.family,
        n_features=len(cfg.data.features),
        n_classes=len(cfg.data.classes),
        feature_columns=list(cfg.data.features),
        classes=list(cfg.data.classes),
        hidden=list(m.hidden),
        d_model=m.d_model,
        n_heads=m.n_heads,
        n_layers=m.n_layers,
        n_tokens=m.n_tokens,
        dropout=m.dropout,
        hf_path=m.hf_path,
        input_mean=mean,
        input_std=std,
    )


def text_spec(cfg: EvergreenConfig) -> ModelSpec:
    """The spec of a text model: one text column, `model.max_length` tokens, the local model."""
    if cfg.model.family not in TEXT_FAMILIES:
        raise ValueError(
            f"data.text is set but model.family is {cfg.model.family!r}: text needs one of "
            f"{sorted(TEXT_FAMILIES)} with model.hf_path (or use numeric data.features)"
        )
    causal = cfg.model.family == CAUSAL_LM
    return ModelSpec(
        family=cfg.model.family,
        n_features=cfg.model.max_length,
        n_classes=_vocab_size(cfg.model.hf_path) if causal else len(cfg.data.classes),
        feature_columns=[str(cfg.data.text)],
        classes=[] if causal else list(cfg.data.classes),
        dropout=cfg.model.dropout,
        hf_path=cfg.model.hf_path,
    )


def _vocab_size(hf_path: str | None) -> int:
    """The vocabulary size (output logits) of a local causal LM, from its config.json."""
    from transformers import AutoConfig

    from continual.base_model import resolve_hf_path

    config = AutoConfig.from_pretrained(str(resolve_hf_path(str(hf_path))), local_files_only=True)
    return int(config.vocab_size)


def champion_distiller(
    section: DailyConfig | WeeklyConfig | MonthlyConfig, champion: ModelState
) -> TokenDistiller | None:
    """The frozen champion as the teacher of a causal LM's update when the cadence's section
    sets `distill_weight` > 0 (config refuses it for other families), else None."""
    if section.distill_weight <= 0 or champion.spec.family != CAUSAL_LM:
        return None
    return TokenDistiller(
        champion.model,
        weight=section.distill_weight,
        temperature=section.distill_temperature,
        pad_token_id=int(champion.model.pad_token_id),  # type: ignore[arg-type]  # an HFCausalLM
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


def start_update(
    champion: ModelState,
    X: torch.Tensor,
    y: torch.Tensor,
    buffer: ReplayBuffer | None = None,
) -> torch.nn.Module:
    """The model an update starts from: a trainable copy of the champion whose classification
    head, for models that expose one (text encoders), is first fitted on frozen features of the
    learning rows plus the replayed rows (`continual.probe`, LP-FT). Without it a class the
    champion never saw enters fine-tuning with a huge loss and its first gradients rewrite the
    encoder: retention 0.905 → 0.452 on the text timeline."""
    model = champion.clone_model()
    if not has_probe_head(model):
        return model
    if buffer is not None and len(buffer) > 0:
        bX, by, _ = buffer.tensors()
        X, y = torch.cat([X, bX.to(X.dtype)]), torch.cat([y, by.to(y.dtype)])
    probe = probe_head_(model, X, y)
    _log_info(
        "head probe on %d rows: loss %.3f → %.3f in %.1fs",
        len(X),
        probe.first_loss,
        probe.last_loss,
        probe.seconds,
    )
    return model


def follow_data_scale(champion: ModelState, X: torch.Tensor, memory: DataMemory) -> ModelState:
    """The champion re-standardised for the data it now meets, as the base an update starts from
    and is anchored at: features whose spread in the learning rows plus the data memory (every
    accepted batch's training rows) exceeds twice the model's std get the wider std
    (`continual.standardization`), the EWC Fisher follows the new coordinates. The champion
    itself is untouched; the gate and the LoRA check compare with it, not with this base."""
    if not can_follow(champion.model):
        return champion
    rows = X
    if memory.buffer is not None and len(memory.buffer) > 0:
        rows = torch.cat([X, memory.buffer.tensors()[0].to(X.dtype)])
    model = copy.deepcopy(champion.model)
    widening = widen_(model, rows)
    if not widening.features:
        return champion
    columns = champion.spec.feature_columns or [str(i) for i in range(champion.spec.n_features)]
    examples = ", ".join(
        f"{columns[j]} {widening.old_std[j]:.3g}→{widening.new_std[j]:.3g}"
        for j in widening.features[:3]
    )
    _log_info(
        "standardisation widened for %d of %d features (%s): later data spreads further",
        len(widening.features),
        len(columns),
        examples,
    )
    ewc = champion.ewc
    if ewc is not None:
        own = ewc.own_fisher
        ewc = EWC(
            rescale_fisher(ewc.fisher, widening),
            parameters_of(model),
            lam=ewc.lam,
            gamma=ewc.gamma,
            own_fisher=None if own is None else rescale_fisher(own, widening),
            kind=ewc.kind,
        )
    spec = dataclasses.replace(champion.spec, input_std=widening.new_std.tolist())
    setattr(model, SPEC_ATTRIBUTE, spec)  # what a torchrun rank rebuilds it from
    return dataclasses.replace(champion, model=model, spec=spec, ewc=ewc)


def _log_fisher(ewc: EWC, cadence: str) -> dict[str, float]:
    """Log the Fisher a version carries (its own, on this version's rows, and the accumulated
    one the next update is anchored with); the same figures as run metrics."""
    own = ewc.own_fisher or {}
    metrics = {
        "ewc.fisher_entries": float(sum(t.numel() for t in ewc.fisher.values())),
        "ewc.own_fisher_mean": _mean(own),
        "ewc.fisher_mean": _mean(ewc.fisher),
    }
    _log_info(
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


def _log_info(message: str, *args: object) -> None:
    """Log to the Prefect run when there is one (tasks), else to this module's logger."""
    try:
        get_run_logger().info(message, *args)
    except MissingContextError:
        logging.getLogger(__name__).info(message, *args)


def _learned(memory: DataMemory) -> dict[str, Any]:
    return {
        "learned": frozenset(memory.batches),
        "memory_run": memory.ref.run_id if memory.ref else None,
    }


@task(cache_policy=NO_CACHE, timeout_seconds=3600)
def train_first_model(cfg: EvergreenConfig, data: PreparedData, memory: DataMemory) -> ModelState:
    """Plain training of the first champion; its own Fisher seeds online EWC."""
    train_df = data.train
    spec = new_spec(cfg, train_df)
    torch.manual_seed(cfg.bootstrap.train.seed)
    model = build_model(spec)
    X, y = frame_to_tensors(train_df, spec, cfg.data.label)
    train_cfg = cfg.bootstrap.train
    settings = settings_from(train_cfg, len(X))
    key = _resume_key("bootstrap", None, data, memory)
    result, _ = _fit(
        model, X, y, settings, "bootstrap", cfg=cfg, processes=train_cfg.processes, resume=key
    )
    # λ and γ belong to the cadence that uses the Fisher; the state only carries F and θ*.
    ewc = EWC.from_model(
        model, *fisher_rows(spec, X, y), lam=0.0, gamma=1.0, kind=fisher_kind(spec)
    )
    facts = training_facts(cfg, "bootstrap", settings, result, rows=len(X))
    return ModelState(model=model, spec=spec, ewc=ewc, training=facts, **_learned(memory))


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


def learning_rows(
    cfg: EvergreenConfig, champion: ModelState, data: PreparedData, memory: DataMemory
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a challenger learns as "new": this run's train rows plus the train rows (from the
    replay buffer) of every earlier batch the champion has not learned — a rejected update's
    data is carried into the next challenger instead of being left to chance in the replay mix."""
    X, y = frame_to_tensors(data.train, champion.spec, cfg.data.label)
    carried = set(memory.batches) - set(champion.learned) - set(data.batch_ids)
    if memory.buffer is None or not carried:
        return X, y
    bX, by, batch_ids = memory.buffer.tensors()
    keep = torch.tensor([b in carried for b in batch_ids], dtype=torch.bool)
    if not bool(keep.any()):
        return X, y
    get_run_logger().info(
        "carrying %d train rows of %d unlearned earlier batch(es)", int(keep.sum()), len(carried)
    )
    return torch.cat([X, bX[keep].to(X.dtype)]), torch.cat([y, by[keep]])


@dataclasses.dataclass(frozen=True)
class Selection:
    """Select rows of the batches the champion learned (old) and has not learned (new)."""

    new: tuple[torch.Tensor, torch.Tensor] | None
    old: tuple[torch.Tensor, torch.Tensor] | None

    def score(self, model: torch.nn.Module) -> float:
        """Mean of the new and old accuracies: plasticity and stability count alike."""
        parts = [
            float(row_scores(model, *rows).mean())
            for rows in (self.new, self.old)
            if rows is not None
        ]
        return float(np.mean(parts)) if parts else float("nan")


def selection_rows(cfg: EvergreenConfig, champion: ModelState, memory: DataMemory) -> Selection:
    new, old = split_by_learned(memory, champion.learned, "select")

    def tensors(frame: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if frame.empty else frame_to_tensors(frame, champion.spec, cfg.data.label)

    return Selection(tensors(new), tensors(old))


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
        result, own = _fit(
            model,
            X,
            y,
            settings,
            f"{label} λ={lam:g}",
            cfg=cfg,
            processes=section.train.processes,
            fisher_kind=None if ewc is None else ewc.kind,
            resume=_resume_key(section_name, champion, data, memory),
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
        **_learned(memory),
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


@task(cache_policy=NO_CACHE, timeout_seconds=3600)
def train_lora_gated(
    cfg: EvergreenConfig, champion: ModelState, data: PreparedData, memory: DataMemory
) -> tuple[ModelState | None, GateDecision]:
    """Daily: a LoRA adapter on the batch, kept only if the gate's rule passes on select rows.

    The adapter starts at zero (it predicts like the champion, up to a text model's refitted
    head), so "before vs after" is "champion vs adapted" and the keep/discard check is `decide()` itself — non-inferiority on the
    select rows of every batch — never a raw difference, never on the gate's rows. Returns
    (state or None, the check's decision).
    """
    from continual.lora import LoraSettings, attach_lora, gated_update  # peft: only when used

    d = cfg.daily
    lora = LoraSettings(
        r=d.lora_r, alpha=d.lora_alpha, dropout=d.lora_dropout, target_modules=d.target_modules
    )
    X, y = learning_rows(cfg, champion, data, memory)
    selection = selection_rows(cfg, champion, memory)
    buffer = memory.buffer if d.replay_ratio > 0 else None
    # A text model's head is fitted first (it is not part of the adapter; see start_update).
    base = follow_data_scale(champion, X, memory)
    peft_model = attach_lora(start_update(base, X, y, buffer), lora)
    verdict: dict[str, GateDecision] = {}
    fit = settings_from(d.train, len(X))
    trained: list[TrainResult] = []
    distiller = champion_distiller(d, champion)

    def fit_adapter(m: torch.nn.Module) -> TrainResult:
        result, _ = _fit(
            m,
            X,
            y,
            fit,
            "lora",
            cfg=cfg,
            processes=d.train.processes,
            resume=_resume_key("daily", champion, data, memory),
            replay=buffer,
            replay_ratio=d.replay_ratio,
            distiller=distiller,
        )
        trained.append(result)
        return result

    def keep(candidate: torch.nn.Module) -> bool:
        verdict["decision"] = _selection_decision(cfg, champion, selection, candidate)
        return verdict["decision"].promote

    result = gated_update(peft_model, fit_adapter, keep)
    if not result.accepted:
        return None, verdict["decision"]
    # The version keeps the adapter separate (base weights + adapter/); loading merges it.
    state = ModelState(
        model=peft_model,
        spec=base.spec,
        ewc=_adapted_ewc(base, peft_model, X, y),
        references=dict(champion.references),
        training=training_facts(
            cfg, "daily", fit, trained[-1], rows=len(X), chosen={"lora": _lora_params(peft_model)}
        ),
        **_learned(memory),
    )
    return state, verdict["decision"]


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
    and retention rows separately, on its own rows.)"""
    parts = [part for part in (selection.new, selection.old) if part is not None]
    if not parts:
        raise ValueError("no select rows to judge the update on: raise data.select_fraction")
    X = torch.cat([X for X, _ in parts])
    y = torch.cat([y for _, y in parts])
    return decide(
        challenger_new_correct=row_scores(candidate, X, y),
        champion_new_correct=row_scores(champion.model, X, y),
        policy=gate_policy(cfg),
    )
