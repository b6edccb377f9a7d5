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
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from continual.checkpoint import load_checkpoint, save_checkpoint
from continual.ewc import EWC
from continual.ewc_state import EWCStateError, ParentFisher, read_fisher
from continual.lineage import (
    ParentReference,
    ParentResolver,
    ParentSource,
    file_sha256,
    read_parent,
    resolve_parent,
)
from continual.models import ModelSpec
from evergreen.config import EvergreenConfig

if TYPE_CHECKING:
    from peft import PeftModel

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


def read_state(
    directory: Path, version: str | None = None, *, parents: ParentResolver = resolve_parent
) -> ModelState:
    """Load a checkpoint directory written by `write_state` (or downloaded from the registry).

    `parents` finds a parent version's checkpoint (`continual.lineage.resolve_parent`): the
    weights of a version stored against its parent, and the Fisher entries its EWC state
    takes from the parent's, come from there.
    """
    model, spec = load_checkpoint(directory, parents=parents)
    ewc_file = directory / EWC_FILE
    learned = _read_learned(directory / LEARNED_FILE)
    return ModelState(
        model=model,
        spec=spec,
        version=version,
        ewc=EWC.load(
            ewc_file,
            model_parameters=dict(model.named_parameters()),
            parent=lambda: _parent_fisher(directory, parents),
        )
        if ewc_file.exists()
        else None,
        learned=frozenset(learned.get("batches", [])),
        references={str(k): float(v) for k, v in learned.get("references", {}).items()},
        memory_run=learned.get("memory_run"),
    )


def _read_learned(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def staging_dir(cfg: EvergreenConfig, cadence: str) -> Path:
    """A fresh folder for a challenger's checkpoint (removed after it is logged)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    path = cfg.home_path / "staging" / f"{cadence}-{stamp}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True, exist_ok=False)
    return path


def write_state(
    state: ModelState,
    directory: Path,
    parent: ParentSource | None = None,
    *,
    parents: ParentResolver = resolve_parent,
) -> Path:
    """Lay a state out as a checkpoint directory; on error nothing half-written is left.

    `parent`: the registered version the state was trained from; a LoRA version of a text model
    is then stored as that parent + its adapter and head (`continual.lineage`), and its EWC
    state as what differs from the parent's: entries of the accumulator equal to the parent's
    (or to γ·F_parent + F_own) are taken from the parent's EWC file, checked on load against
    the digest `parent.json` records for it. A version stored against its base keeps a full
    accumulator. Either way the anchor is not stored when it is the version's own weights as
    they load (for a LoRA version: folded), which `read_state` fills in.
    `parents`: how the parent's own parent is found (see `read_state`).
    """
    try:
        save_checkpoint(directory, state.model, state.spec, parent=parent, parents=parents)
        if state.ewc is not None:
            state.ewc.save(
                directory / EWC_FILE,
                anchor_in_model=state.ewc.anchored_at(weights_as_loaded(state.model)),
                parent=_fisher_stored_against(directory, parent, parents),
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


def weights_as_loaded(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters `load_checkpoint` gives back for `model`: its own, or for a peft model
    the base model's with the adapter folded in (by the same merge loading uses), under the
    base model's names."""
    if not hasattr(model, "peft_config"):
        return {n: p.detach() for n, p in model.named_parameters()}
    from continual.lora import merge_adapter  # peft: only for peft models

    return parameters_of(merge_adapter(cast("PeftModel", copy.deepcopy(model))))


def _fisher_stored_against(
    directory: Path, parent: ParentSource | None, parents: ParentResolver
) -> ParentFisher | None:
    """The parent's accumulator when the checkpoint just written is stored against `parent`
    and the parent has an EWC state; None otherwise (stored against the base: full state)."""
    reference = read_parent(directory)
    if parent is None or reference is None or EWC_FILE not in reference.manifest:
        return None
    return _fisher_file(parent.directory, reference, parents)


def _parent_fisher(directory: Path, parents: ParentResolver) -> ParentFisher:
    """The accumulator of the parent version `directory`'s EWC state takes entries from.

    Raises:
        EWCStateError: the checkpoint has no parent, or the parent's EWC file is not the one
            `parent.json` records.
        ParentVersionError: the parent cannot be found.
    """
    reference = read_parent(directory)
    if reference is None:
        raise EWCStateError(
            f"{directory / EWC_FILE}: takes Fisher entries from a parent version, but "
            f"{directory} is not stored against one (no parent.json)"
        )
    return _fisher_file(parents(reference), reference, parents)


def _fisher_file(
    parent_dir: Path, reference: ParentReference, parents: ParentResolver
) -> ParentFisher:
    """The parent's accumulator, its file hashed against the manifest first; a parent that
    itself references its own parent is resolved in turn (the chain `parent.json` bounds)."""
    path = parent_dir / EWC_FILE
    recorded = reference.manifest.get(EWC_FILE)
    actual = file_sha256(path) if path.is_file() else None
    if recorded is None or actual != recorded:
        raise EWCStateError(
            f"parent {reference.uri}: its {EWC_FILE} is "
            f"{'missing' if actual is None else 'sha256 ' + actual[:12] + '…'}, not the "
            f"{'(none recorded)' if recorded is None else recorded[:12] + '…'} this version "
            "was stored against; restore that parent version to load this one"
        )
    fisher = read_fisher(path, parent=lambda: _parent_fisher(parent_dir, parents))
    return ParentFisher(fisher=fisher, sha256=actual)


def parameters_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of every parameter (an EWC anchor).

    Not filtered on requires_grad: a model that went through peft's merge comes back frozen.
    """
    return {n: p.detach().clone() for n, p in model.named_parameters()}
