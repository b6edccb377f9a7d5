"""Where a cadence's training state is saved, and what makes it resumable (`continual.resume`).

A run saves its training state under `<home>/resume/<cadence>/<key>/<fit>.safetensors`, the key
being a hash of what makes a resume valid: the cadence, the champion version it starts from,
the data hash of its batches, the data-memory snapshot it replays (carried rows, replay
buffer) and the effective configuration (every key but `home` and the checkpoint cadence
itself). Each fit (one per λ of an "auto" grid) also carries a fingerprint of its own inputs:
the rows, the starting weights, the settings. A later run of the same cadence with the same key
resumes (it logs "resumed at step k of n"; a fit that had finished is not trained again);
anything else discards the old state when its training starts. The cadence's folder is removed
when the run ends — promoted, rejected or failed cleanly (`tasks.promote.challenger_workspace`);
only a killed run and one stopped at its time limit (`train.timeout_minutes`) leave it behind.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from continual.resume import Checkpointing, tensor_digest, trained_tensors
from continual.training import TrainSettings
from evergreen.cadences import by_section
from evergreen.config import EvergreenConfig
from model_registry.fault_hooks import hang_here

RESUME_DIR = "resume"
# how often the state is saved and how long a run may take: not what is trained
_CADENCE_KNOBS = ("checkpoint_every_steps", "checkpoint_every_seconds", "timeout_minutes")


@dataclass(frozen=True)
class ResumeKey:
    """What a training run must share with an earlier, killed one to resume its state."""

    section: str  # the config section ("monthly", "weekly", "daily", "bootstrap")
    champion: str  # the champion version it starts from ("none" for the first champion)
    data_hash: str
    memory: str  # the data-memory snapshot (run id) it replays and carries rows from

    @property
    def cadence(self) -> str:
        return by_section(self.section).name

    def digest(self, cfg: EvergreenConfig) -> str:
        facts = [self.cadence, self.champion, self.data_hash, self.memory, config_hash(cfg)]
        return hashlib.sha256("\n".join(facts).encode()).hexdigest()[:24]


def config_hash(cfg: EvergreenConfig) -> str:
    """A hash of the effective configuration, without `home`, the checkpoint cadences and the
    time limit (they change where, how often and how long, not what is trained)."""
    tree = cfg.model_dump(mode="json")
    tree.pop("home", None)
    for section in tree.values():
        train = section.get("train") if isinstance(section, dict) else None
        if isinstance(train, dict):
            for knob in _CADENCE_KNOBS:
                train.pop(knob, None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


def resume_root(cfg: EvergreenConfig, cadence: str) -> Path:
    return cfg.home_path / RESUME_DIR / cadence


def discard_states(cfg: EvergreenConfig, cadence: str) -> None:
    """Remove the cadence's saved training states (its run has ended)."""
    shutil.rmtree(resume_root(cfg, cadence), ignore_errors=True)


def checkpointing_for(
    cfg: EvergreenConfig,
    key: ResumeKey,
    label: str,
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    settings: TrainSettings,
    *,
    on_resumed: Callable[[int, int], None],
) -> Checkpointing | None:
    """The fit's checkpointing, or None when the section's cadences are both 0. States of this
    cadence saved under another key are removed first: they can never be resumed."""
    train = getattr(cfg, key.section).train
    if not train.checkpoint_every_steps and not train.checkpoint_every_seconds:
        return None
    root, digest = resume_root(cfg, key.cadence), key.digest(cfg)
    if root.is_dir():
        for stale in root.iterdir():
            if stale.name != digest:
                shutil.rmtree(stale, ignore_errors=True)
    inputs = tensor_digest(X, y, trained_tensors(model))
    facts = [digest, label, repr(settings), inputs]
    return Checkpointing(
        root / digest / f"{_slug(label)}.safetensors",
        hashlib.sha256("\n".join(facts).encode()).hexdigest(),
        every_steps=train.checkpoint_every_steps,
        every_seconds=train.checkpoint_every_seconds,
        on_resumed=on_resumed,
        on_saved=lambda step: hang_here("train.state-saved"),  # test hook: state on disk
    )


def _slug(label: str) -> str:
    """A file name for a fit label such as "finetune λ=10" (plus a hash: labels stay apart)."""
    plain = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-")[:60] or "fit"
    return f"{plain}-{hashlib.sha256(label.encode()).hexdigest()[:8]}"
