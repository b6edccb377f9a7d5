"""What an update of a champion starts from, shared by the EWC (weekly, monthly) and LoRA
(daily) challengers: the rows it learns, the select rows its choices are judged on, the champion
re-standardised for the data it now meets, the start model (head probed first) and the teacher."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pandas as pd
import torch
from prefect import get_run_logger

from continual.distillation import TokenDistiller
from continual.ewc import EWC
from continual.inference import row_scores
from continual.models import CAUSAL_LM, SPEC_ATTRIBUTE, ModelSpec
from continual.probe import has_probe_head, probe_head_
from continual.replay import ReservoirBuffer as ReplayBuffer
from continual.standardization import Widening, can_follow, rescale_fisher, widen_
from continual.training import TrainSettings
from evergreen.config import DailyConfig, EvergreenConfig, MonthlyConfig, WeeklyConfig
from evergreen.errors import ConfigError
from tasks.common import frame_to_tensors
from tasks.evaluate import split_by_learned
from tasks.memory import DataMemory
from tasks.state import ModelState, parameters_of
from tasks.train import log_info, settings_from
from tasks.validate import PreparedData


@dataclasses.dataclass(frozen=True)
class UpdateStart:
    """An update's inputs, prepared once whichever method then trains it."""

    X: torch.Tensor  # the learning rows (`learning_rows`)
    y: torch.Tensor
    settings: TrainSettings
    buffer: ReplayBuffer | None  # the data memory to replay; None when the replay ratio is 0
    selection: Selection
    base: ModelState  # the champion re-standardised for the data (`follow_data_scale`)
    start: torch.nn.Module  # a trainable copy of the base, head probed (`start_update`)
    distiller: TokenDistiller | None  # the champion as teacher (`champion_distiller`)


def prepare_update(
    cfg: EvergreenConfig,
    champion: ModelState,
    data: PreparedData,
    memory: DataMemory,
    section: DailyConfig | WeeklyConfig | MonthlyConfig,
) -> UpdateStart:
    """The inputs of an update of `champion` by `section`'s cadence. The learning rows come
    first: the base's standardisation follows them and the head is probed on them."""
    X, y = learning_rows(cfg, champion, data, memory)
    buffer = memory.buffer if section.replay_ratio > 0 else None
    selection = selection_rows(cfg, champion, memory)
    base = follow_data_scale(champion, X, memory)
    start = start_update(base, X, y, buffer)
    return UpdateStart(
        X=X,
        y=y,
        settings=settings_from(section.train, len(X)),
        buffer=buffer,
        selection=selection,
        base=base,
        start=start,
        distiller=champion_distiller(section, champion),
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
        return _some_rows(cfg, data, X, y)
    bX, by, batch_ids = memory.buffer.tensors()
    keep = torch.tensor([b in carried for b in batch_ids], dtype=torch.bool)
    if not bool(keep.any()):
        return _some_rows(cfg, data, X, y)
    get_run_logger().info(
        "carrying %d train rows of %d unlearned earlier batch(es)", int(keep.sum()), len(carried)
    )
    return torch.cat([X, bX[keep].to(X.dtype)]), torch.cat([y, by[keep]])


def _some_rows(
    cfg: EvergreenConfig, data: PreparedData, X: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(X, y)`, unless there is nothing to train on: batches so small (`data.min_rows` lowered)
    that every row went to the select or gate role (a one-row batch can).

    Raises:
        ConfigError: no training rows (names the batches, their sizes and what to change).
    """
    if len(X):
        return X, y
    sizes = ", ".join(f"{b} ({len(data.frames.get(b, ()))} rows)" for b in data.batch_ids)
    raise ConfigError(
        f"no training rows: every row of {sizes} went to the held-out roles "
        f"(data.select_fraction {cfg.data.select_fraction}, data.gate_fraction "
        f"{cfg.data.gate_fraction}), which never train; the rows are kept in the data memory — "
        f"land larger batches, or raise data.min_rows ({cfg.data.min_rows}) so that a batch "
        "this small is quarantined instead"
    )


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
    """The data memory's select rows, split by whether the champion learned their batch."""
    new, old = split_by_learned(memory, champion.learned, "select")

    def tensors(frame: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if frame.empty else frame_to_tensors(frame, champion.spec, cfg.data.label)

    return Selection(tensors(new), tensors(old))


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
    _log_widening(champion.spec, widening)
    ewc = None if champion.ewc is None else _rescaled_ewc(champion.ewc, model, widening)
    spec = dataclasses.replace(champion.spec, input_std=_widened_spec_std(champion.spec, widening))
    setattr(model, SPEC_ATTRIBUTE, spec)  # what a torchrun rank rebuilds it from
    return dataclasses.replace(champion, model=model, spec=spec, ewc=ewc)


def _widened_spec_std(spec: ModelSpec, widening: Widening) -> list[float]:
    """The spec's std with only the widened features replaced: the others keep the parent's
    values exactly (a float64 list for the first champion; the buffer is float32), so comparing
    a challenger's spec with its parent's counts the features really widened."""
    std = list(spec.input_std) if spec.input_std is not None else widening.old_std.tolist()
    for j in widening.features:
        std[j] = float(widening.new_std[j])
    return std


def _log_widening(spec: ModelSpec, widening: Widening) -> None:
    columns = spec.feature_columns or [str(i) for i in range(spec.n_features)]
    examples = ", ".join(
        f"{columns[j]} {widening.old_std[j]:.3g}→{widening.new_std[j]:.3g}"
        for j in widening.features[:3]
    )
    log_info(
        "standardisation widened for %d of %d features (%s): later data spreads further",
        len(widening.features),
        len(columns),
        examples,
    )


def _rescaled_ewc(ewc: EWC, model: torch.nn.Module, widening: Widening) -> EWC:
    """The champion's EWC state in the widened model's coordinates (anchored at its weights)."""
    own = ewc.own_fisher
    return EWC(
        rescale_fisher(ewc.fisher, widening),
        parameters_of(model),
        lam=ewc.lam,
        gamma=ewc.gamma,
        own_fisher=None if own is None else rescale_fisher(own, widening),
        kind=ewc.kind,
    )


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
    log_info(
        "head probe on %d rows: loss %.3f → %.3f in %.1fs",
        len(X),
        probe.first_loss,
        probe.last_loss,
        probe.seconds,
    )
    return model


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
