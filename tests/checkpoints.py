"""Tiny real model checkpoints for registry tests."""

from __future__ import annotations

from pathlib import Path

import torch

from continual.checkpoint import save_checkpoint
from continual.models import ModelSpec, build_model


def tiny_checkpoint(
    directory: Path, seed: int, features: list[str], classes: list, hidden: int = 8
) -> Path:
    """A real MLP checkpoint (standardised inputs); different seeds give different weights."""
    torch.manual_seed(seed)
    spec = ModelSpec(
        family="mlp",
        n_features=len(features),
        n_classes=len(classes),
        feature_columns=list(features),
        classes=list(classes),
        hidden=[hidden],
        input_mean=[0.5] * len(features),
        input_std=[2.0] * len(features),
    )
    return save_checkpoint(directory, build_model(spec), spec)
