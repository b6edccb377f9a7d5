"""Plain helpers shared by the task adapters: frames to tensors, lineage facts.

Nothing here talks to Prefect; the `@task` functions in the sibling modules call these.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from continual.models import ModelSpec
from data_plane.profile import label_key


def encode_labels(labels: pd.Series, classes: list[Any]) -> torch.Tensor:
    """Map label values to class indices (the logit order of `classes`).

    Raises:
        ValueError: a label is not one of `classes` (validation should have caught it).
    """
    index = {label_key(c): i for i, c in enumerate(classes)}
    keys = [label_key(v) for v in labels.tolist()]
    unknown = sorted({k for k in keys if k not in index})
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not in data.classes {classes}")
    return torch.tensor([index[k] for k in keys], dtype=torch.long)


def frame_to_tensors(
    df: pd.DataFrame, spec: ModelSpec, label: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (float32, in the spec's column order) and class indices of a validated frame."""
    features = df[spec.feature_columns].to_numpy(dtype=np.float32, copy=True)
    return torch.from_numpy(features), encode_labels(df[label], spec.classes)


def git_commit() -> str:
    """The commit of the code that trained a model, for lineage ("unknown" outside a checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def current_flow_run_id() -> str:
    """The Prefect flow-run id when running inside a flow, else "local"."""
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id or "local")
    except Exception:
        return "local"
