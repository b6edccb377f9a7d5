"""Real digits as tensors with the spec of a small standardised MLP (the training-loop tests)."""

from __future__ import annotations

from functools import lru_cache

import torch
from sklearn.datasets import load_digits

from continual.models import ModelSpec, fit_standardizer


@lru_cache(maxsize=2)
def digits_tensors(dropout: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, ModelSpec]:
    """(X, y, spec): all 1,797 scans, standardised with the first 1,200 (hidden [64])."""
    data = load_digits()
    mean, std = fit_standardizer(data.data[:1200])
    spec = ModelSpec("mlp", 64, 10, hidden=[64], input_mean=mean, input_std=std, dropout=dropout)
    return torch.tensor(data.data, dtype=torch.float32), torch.tensor(data.target), spec
