"""The demo's plain-PyTorch references on exactly the rows the flows train on.

- naive: the bootstrap champion fine-tuned on each new batch in turn (no replay, EWC or gate):
  what forgetting looks like;
- joint: a model trained from scratch on every training row seen so far, at each batch: the
  quality bound a continual learner is measured against.

Both train on the batches' *train* rows (the flows' own row-hash split) and are scored on their
*gate* rows, like the champion, with the optimiser settings of the cadence they stand for
(`tasks.train.settings_from`: steps, or epochs over the rows for the text demo's small batches).
For a text model, "from scratch" means the pretrained encoder with a new head: the same start as
the bootstrap flow. On the first batch joint training *is* the bootstrap flow (same rows, recipe
and start), so the demo takes the bootstrap champion's row there instead of training it twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import pandas as pd
import torch

from continual.inference import accuracy
from continual.models import TEXT_FAMILIES, ModelSpec, build_model, fit_standardizer
from continual.training import train
from evergreen.config import EvergreenConfig
from tasks.common import frame_to_tensors
from tasks.state import ModelState
from tasks.train import settings_from


@dataclass
class HeldOut:
    """Each valid batch's train and gate rows, in timeline order."""

    train: dict[str, pd.DataFrame] = field(default_factory=dict)
    gate: dict[str, pd.DataFrame] = field(default_factory=dict)

    def seen(self, until: str) -> list[str]:
        return [b for b in self.gate if b <= until]


def accuracy_row(
    cfg: EvergreenConfig, model: torch.nn.Module, held_out: HeldOut, until: str, spec: ModelSpec
) -> dict[str, float]:
    """Accuracy on the gate rows of every batch up to `until`."""
    row = {}
    for batch_id in held_out.seen(until):
        X, y = frame_to_tensors(held_out.gate[batch_id], spec, cfg.data.label)
        row[batch_id] = accuracy(model, X, y)
    return row


def naive_rows(
    cfg: EvergreenConfig, champion: ModelState, held_out: HeldOut, batches: Iterable[str]
) -> dict[str, dict[str, float]]:
    """batch → accuracy row of the naive fine-tune right after learning that batch."""
    model, rows = champion.clone_model(), {}
    for batch_id in batches:
        X, y = frame_to_tensors(held_out.train[batch_id], champion.spec, cfg.data.label)
        train(model, X, y, settings_from(cfg.monthly.train, len(X)))
        rows[batch_id] = accuracy_row(cfg, model, held_out, batch_id, champion.spec)
    return rows


def joint_rows(
    cfg: EvergreenConfig,
    spec: ModelSpec,
    held_out: HeldOut,
    batches: Iterable[str],
    *,
    skip: Iterable[str] = (),
) -> dict[str, dict[str, float]]:
    """batch → accuracy row of a model trained from scratch on every train row up to it.

    `spec` is the first champion's (a tabular model is re-standardised on each batch's rows);
    batches in `skip` still add their rows to the later models but get no model of their own
    (the caller has one: the bootstrap champion is joint training on the first batch).
    """
    rows, seen, skipped = {}, [], set(skip)
    for batch_id in batches:
        seen.append(held_out.train[batch_id])
        if batch_id in skipped:
            continue
        frame = pd.concat(seen, ignore_index=True)
        own = joint_spec(cfg, spec, frame)
        torch.manual_seed(cfg.bootstrap.train.seed)
        model = build_model(own)
        X, y = frame_to_tensors(frame, own, cfg.data.label)
        train(model, X, y, settings_from(cfg.bootstrap.train, len(X)))
        rows[batch_id] = accuracy_row(cfg, model, held_out, batch_id, own)
    return rows


def joint_spec(cfg: EvergreenConfig, spec: ModelSpec, frame: pd.DataFrame) -> ModelSpec:
    """The champion's spec for a model trained on `frame`: a tabular model standardises its
    inputs with the statistics of those rows (as the bootstrap flow does); a text model reads
    token ids and has no standardiser, so its spec is the champion's."""
    if spec.family in TEXT_FAMILIES:
        return spec
    mean, std = fit_standardizer(frame[cfg.data.features].to_numpy("float32"))
    return replace(spec, input_mean=mean, input_std=std)
