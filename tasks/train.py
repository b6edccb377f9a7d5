"""Train challenger: one thin task per method; the algorithms live in `continual`."""

from __future__ import annotations

import copy

import pandas as pd
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from continual.ewc import EWC
from continual.lora import LoraSettings, attach_lora, gated_update
from continual.models import ModelSpec, build_model, fit_standardizer
from continual.replay import ReservoirBuffer
from continual.training import TrainResult, TrainSettings, accuracy, train
from data_plane.splits import update_retention
from evergreen.config import EvergreenConfig, TrainConfig
from tasks.common import frame_to_tensors
from tasks.limits import training_slot
from tasks.progress import step_progress
from tasks.state import ModelState, parameters_of


def settings_from(config: TrainConfig) -> TrainSettings:
    return TrainSettings(
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        seed=config.seed,
    )


def _fit(model, X, y, config: TrainConfig, label: str, **methods) -> TrainResult:
    """Run the training loop holding the device slot, with a progress bar."""
    with training_slot(), step_progress(label, config.steps) as on_step:
        result = train(model, X, y, settings_from(config), on_step=on_step, **methods)
    get_run_logger().info(
        "%s: %d steps in %.1fs, loss %.3f → %.3f on %s",
        label,
        result.steps,
        result.seconds,
        result.first_loss,
        result.last_loss,
        result.device,
    )
    return result


def carry_forward(cfg: EvergreenConfig, state: ModelState, train_df: pd.DataFrame, holdout):
    """Add the new rows to the replay buffer and the new holdout to the retention set."""
    X, y = frame_to_tensors(train_df, state.spec, cfg.data.label)
    # the buffer may be the champion's own object: the challenger gets its own copy
    state.buffer = copy.deepcopy(state.buffer)
    if state.buffer is None:
        state.buffer = ReservoirBuffer(
            cfg.weekly.replay_capacity,
            state.spec.n_features,
            policy=cfg.weekly.replay_policy,
            seed=cfg.bootstrap_train.seed,
        )
    for batch_id in sorted(train_df["batch_id"].unique()):
        rows = torch.from_numpy((train_df["batch_id"] == batch_id).to_numpy(copy=True))
        state.buffer.add(X[rows], y[rows], batch_id=str(batch_id))
    retention = state.retention
    for batch_id, part in holdout.groupby("batch_id", sort=True):
        retention = update_retention(
            retention,
            part.drop(columns=["batch_id"]),
            batch_id=str(batch_id),
            label=cfg.data.label,
            per_batch=cfg.data.retention_per_batch,
            max_rows=cfg.data.retention_max_rows,
        )
    state.retention = retention


def new_spec(cfg: EvergreenConfig, train_df: pd.DataFrame) -> ModelSpec:
    """The model spec of a first champion: sizes from config, standardisation from its data."""
    if not cfg.data.features:
        raise NotImplementedError(
            "text pipelines (data.text) are not wired into the flows yet: use numeric `features`"
        )
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


@task(cache_policy=NO_CACHE, timeout_seconds=3600)
def train_first_model(cfg: EvergreenConfig, train_df: pd.DataFrame, holdout) -> ModelState:
    """Plain training of the first champion; its Fisher seeds online EWC."""
    spec = new_spec(cfg, train_df)
    torch.manual_seed(cfg.bootstrap_train.seed)
    model = build_model(spec)
    X, y = frame_to_tensors(train_df, spec, cfg.data.label)
    _fit(model, X, y, cfg.bootstrap_train, "bootstrap")
    ewc = EWC.from_model(model, X, y, lam=cfg.monthly.ewc_lambda, gamma=cfg.monthly.fisher_decay)
    state = ModelState(model=model, spec=spec, ewc=ewc)
    carry_forward(cfg, state, train_df, holdout)
    return state


def _anchored_ewc(cfg: EvergreenConfig, champion: ModelState, lam: float, gamma: float) -> EWC:
    """Online EWC anchored at the current champion; Fisher from its lineage or its retention set."""
    if champion.ewc is not None:
        return EWC(champion.ewc.fisher, parameters_of(champion.model), lam=lam, gamma=gamma)
    if champion.retention is None or champion.retention.empty:
        raise ValueError(f"champion v{champion.version} has neither a Fisher nor a retention set")
    X, y = frame_to_tensors(champion.retention, champion.spec, cfg.data.label)
    return EWC.from_model(champion.model, X, y, lam=lam, gamma=gamma)


def _ewc_challenger(cfg, champion: ModelState, data, lam, gamma, train_cfg, label, replay=0.0):
    model = champion.clone_model()
    X, y = frame_to_tensors(data.train, champion.spec, cfg.data.label)
    ewc = _anchored_ewc(cfg, champion, lam, gamma)
    buffer = champion.buffer if replay > 0 else None
    _fit(model, X, y, train_cfg, label, ewc=ewc, replay=buffer, replay_ratio=replay)
    ewc.consolidate(model, X, y)  # F ← γ·F_old + F_new at the new weights; θ* ← new weights
    state = ModelState(
        model=model,
        spec=champion.spec,
        ewc=ewc,
        buffer=champion.buffer,
        retention=champion.retention,
    )
    carry_forward(cfg, state, data.train, data.holdout)
    return state


@task(cache_policy=NO_CACHE, timeout_seconds=3600)
def train_finetune_ewc(cfg: EvergreenConfig, champion: ModelState, data) -> ModelState:
    """Monthly: full fine-tune of every weight with the online-EWC penalty."""
    m = cfg.monthly
    return _ewc_challenger(cfg, champion, data, m.ewc_lambda, m.fisher_decay, m.train, "finetune")


@task(cache_policy=NO_CACHE, timeout_seconds=3600)
def train_replay_ewc(cfg: EvergreenConfig, champion: ModelState, data) -> ModelState:
    """Weekly: experience replay from the reservoir mixed into each step, plus EWC."""
    w = cfg.weekly
    return _ewc_challenger(
        cfg, champion, data, w.ewc_lambda, w.fisher_decay, w.train, "replay", replay=w.replay_ratio
    )


@task(cache_policy=NO_CACHE, timeout_seconds=3600)
def train_lora_gated(cfg: EvergreenConfig, champion: ModelState, data) -> tuple:
    """Daily: a LoRA adapter trained on the batch, kept only if validation does not regress.

    Validation is the batch's holdout plus the champion's retention set, so the adapter has to
    help on the new data without hurting the old. Returns (state or None, gate result).
    """
    d = cfg.daily
    settings = LoraSettings(
        r=d.lora_r, alpha=d.lora_alpha, dropout=d.lora_dropout, target_modules=d.target_modules
    )
    peft_model = attach_lora(champion.clone_model(), settings)
    X, y = frame_to_tensors(data.train, champion.spec, cfg.data.label)
    validation = pd.concat([data.holdout, champion.retention], ignore_index=True)
    Xv, yv = frame_to_tensors(validation, champion.spec, cfg.data.label)
    buffer = champion.buffer if d.replay_ratio > 0 else None
    result = gated_update(
        peft_model,
        lambda m: _fit(m, X, y, d.train, "lora", replay=buffer, replay_ratio=d.replay_ratio),
        lambda m: accuracy(m, Xv, yv),
        max_regression=d.max_regression,
    )
    if not result.accepted:
        return None, result
    # The version keeps the adapter separate (base weights + adapter/); loading merges it.
    state = ModelState(
        model=peft_model,
        spec=champion.spec,
        ewc=champion.ewc,
        buffer=champion.buffer,
        retention=champion.retention,
    )
    carry_forward(cfg, state, data.train, data.holdout)
    return state, result
