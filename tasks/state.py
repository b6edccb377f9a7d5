"""A model version's working state: weights, EWC state, what it learned, its references.

The champion is downloaded from the registry into this shape, a challenger is built in it, and
`write_state` lays it out as the checkpoint directory the registry logs (docs/CONTRACTS.md).
Data (replay buffer, held-out rows) is not part of a version: it lives in the data memory
(tasks/memory.py); a version records which batches it learned and the fixed per-batch
reference accuracies the gate bounds cumulative forgetting with.
"""

from __future__ import annotations

import copy
import json
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from continual.checkpoint import load_checkpoint, save_checkpoint
from continual.ewc import EWC
from continual.lineage import ParentSource
from continual.models import ModelSpec
from evergreen.config import EvergreenConfig

EWC_FILE = "ewc.safetensors"
LEARNED_FILE = "learned.json"


@dataclass(frozen=True)
class TrainingFacts:
    """How a challenger was trained, for its MLflow run (not part of the checkpoint).

    Attributes:
        params: the effective configuration, flat ("method", "ewc.lambda", "train.lr", …).
        losses: the training loss per optimiser step of the model that was kept.
        seconds: wall time of all training for this challenger (every λ tried included).
        steps: optimiser steps of the model that was kept.
        device: where it trained.
    """

    params: dict[str, str]
    losses: tuple[float, ...] = ()
    seconds: float = 0.0
    steps: int = 0
    device: str = "cpu"


@dataclass
class ModelState:
    """Everything a cadence needs from a model version (or produces for a new one)."""

    model: nn.Module
    spec: ModelSpec
    version: str | None = None
    ewc: EWC | None = None
    learned: frozenset[str] = frozenset()
    references: dict[str, float] = field(default_factory=dict)
    memory_run: str | None = None
    training: TrainingFacts | None = None  # set on a freshly trained challenger only
    origin: ParentSource | None = None  # where a registered version was loaded from

    def clone_model(self) -> nn.Module:
        """A trainable deep copy (the champion itself is never modified in place)."""
        return make_trainable(copy.deepcopy(self.model))


def make_trainable(model: nn.Module) -> nn.Module:
    """Mark what training may change, in place: every parameter, or what the model itself says
    through `restrict_trainable_()` (text encoders keep embeddings and LayerNorms frozen)."""
    model.requires_grad_(True)
    restrict = getattr(model, "restrict_trainable_", None)
    if callable(restrict):
        restrict()
    return model


def read_state(directory: Path, version: str | None = None) -> ModelState:
    """Load a checkpoint directory written by `write_state` (or downloaded from the registry)."""
    model, spec = load_checkpoint(directory)
    ewc_file = directory / EWC_FILE
    learned = _read_learned(directory / LEARNED_FILE)
    return ModelState(
        model=model,
        spec=spec,
        version=version,
        ewc=EWC.load(ewc_file, model_parameters=dict(model.named_parameters()))
        if ewc_file.exists()
        else None,
        learned=frozenset(learned.get("batches", [])),
        references={str(k): float(v) for k, v in learned.get("references", {}).items()},
        memory_run=learned.get("memory_run"),
    )


def _read_learned(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def staging_dir(cfg: EvergreenConfig, cadence: str) -> Path:
    """A fresh folder for a challenger's checkpoint (removed after it is logged)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    path = cfg.home_path / "staging" / f"{cadence}-{stamp}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True, exist_ok=False)
    return path


def write_state(state: ModelState, directory: Path, parent: ParentSource | None = None) -> Path:
    """Lay a state out as a checkpoint directory; on error nothing half-written is left.

    `parent`: the registered version the state was trained from; a LoRA version of a text model
    is then stored as that parent + its adapter and head (`continual.lineage`).
    """
    try:
        save_checkpoint(directory, state.model, state.spec, parent=parent)
        if state.ewc is not None:
            # Anchored at the weights saved beside it (not a peft model: its names differ):
            # reference them instead of storing a second copy.
            plain = not hasattr(state.model, "peft_config")
            state.ewc.save(
                directory / EWC_FILE,
                anchor_in_model=plain and state.ewc.anchored_at(parameters_of(state.model)),
            )
        learned = {
            "batches": sorted(state.learned),
            "references": dict(sorted(state.references.items())),
            "memory_run": state.memory_run,
        }
        (directory / LEARNED_FILE).write_text(json.dumps(learned, indent=1))
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return directory


def parameters_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of every parameter (an EWC anchor).

    Not filtered on requires_grad: a model that went through peft's merge comes back frozen.
    """
    return {n: p.detach().clone() for n, p in model.named_parameters()}
