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

from continual.models import CAUSAL_LM, TEXT_FAMILIES, ModelSpec
from continual.text import encode_texts, tokenizer_for
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
    """Model inputs and class indices of a validated frame: features (float32, in the spec's
    column order), or for a text model the token ids of its text column (`continual.text`).
    A causal LM learns the text itself: its labels are placeholders (zeros)."""
    if spec.family == CAUSAL_LM:
        return model_inputs(df, spec), torch.zeros(len(df), dtype=torch.long)
    return model_inputs(df, spec), encode_labels(df[label], spec.classes)


def model_inputs(df: pd.DataFrame, spec: ModelSpec) -> torch.Tensor:
    """What the model reads from `df`: float32 features, or token ids [N, max_length]."""
    if spec.family in TEXT_FAMILIES:
        assert spec.hf_path is not None  # guaranteed by ModelSpec validation
        return text_ids(df[spec.feature_columns[0]], spec.hf_path, spec.n_features)
    return torch.from_numpy(df[spec.feature_columns].to_numpy(dtype=np.float32, copy=True))


def text_ids(texts: pd.Series, hf_path: str, max_length: int) -> torch.Tensor:
    """Token ids of a text column with the model's own tokenizer, padded to `max_length`."""
    return encode_texts(tokenizer_for(hf_path), texts.astype(str).tolist(), max_length)


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
