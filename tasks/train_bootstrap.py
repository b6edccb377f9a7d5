"""Bootstrap: plain training of the first champion, whose model spec (sizes from config,
standardisation or tokenisation from its data) every later version inherits."""

from __future__ import annotations

import pandas as pd
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from continual.ewc import EWC
from continual.models import CAUSAL_LM, TEXT_FAMILIES, ModelSpec, build_model, fit_standardizer
from evergreen.config import EvergreenConfig
from tasks.common import frame_to_tensors
from tasks.memory import DataMemory
from tasks.run_log import run_logger
from tasks.state import ModelState
from tasks.train import (
    fisher_kind,
    fisher_rows,
    fit_model,
    learned_fields,
    resume_key,
    settings_from,
    training_facts,
)
from tasks.validate import PreparedData


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

    from continual.base_model import local_hf_directory  # no model there: model.hf_path, exit 3

    config = AutoConfig.from_pretrained(
        str(local_hf_directory(str(hf_path))), local_files_only=True
    )
    return int(config.vocab_size)


def missing_classes(spec: ModelSpec, labels: pd.Series) -> list[object]:
    """The classes of a classifier's spec that no training row carries (none for a causal LM)."""
    present = {str(v) for v in labels.unique()}
    return [c for c in spec.classes if str(c) not in present]


def warn_missing_classes(cfg: EvergreenConfig, spec: ModelSpec, train_df: pd.DataFrame) -> None:
    """A first champion trained without some of `data.classes` never predicts them until an
    update brings rows of them (the gate's exchange rule lets such an update through), and one
    trained on a single class predicts it for every row: say so in the run's log, not silently."""
    if spec.family == CAUSAL_LM or cfg.data.label not in train_df.columns:
        return
    absent = missing_classes(spec, train_df[cfg.data.label])
    if not absent:
        return
    seen = len(spec.classes) - len(absent)
    them = "them" if len(absent) > 1 else "it"
    run_logger().warning(
        "the first champion trains on %d of the %d classes of data.classes (no training row of "
        "%s): it will not predict %s until an update trains on rows of %s%s",
        seen,
        len(spec.classes),
        absent,
        them,
        them,
        "; with one class it predicts that class for every row" if seen == 1 else "",
    )


@task(cache_policy=NO_CACHE, timeout_seconds=3600)
def train_first_model(cfg: EvergreenConfig, data: PreparedData, memory: DataMemory) -> ModelState:
    """Plain training of the first champion; its own Fisher seeds online EWC."""
    train_df = data.train
    spec = new_spec(cfg, train_df)
    warn_missing_classes(cfg, spec, train_df)
    torch.manual_seed(cfg.bootstrap.train.seed)
    model = build_model(spec)
    X, y = frame_to_tensors(train_df, spec, cfg.data.label)
    train_cfg = cfg.bootstrap.train
    settings = settings_from(train_cfg, len(X))
    key = resume_key("bootstrap", None, data, memory)
    result, _ = fit_model(
        model, X, y, settings, "bootstrap", cfg=cfg, processes=train_cfg.processes, resume=key
    )
    # λ and γ belong to the cadence that uses the Fisher; the state only carries F and θ*.
    ewc = EWC.from_model(
        model, *fisher_rows(spec, X, y), lam=0.0, gamma=1.0, kind=fisher_kind(spec)
    )
    facts = training_facts(cfg, "bootstrap", settings, result, rows=len(X))
    return ModelState(model=model, spec=spec, ewc=ewc, training=facts, **learned_fields(memory))
