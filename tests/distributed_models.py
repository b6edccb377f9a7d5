"""Models for the torchrun tests: a model family ("package.module:factory") the ranks import
and rebuild from its spec, as they do the built-in families."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor, nn

from continual.models import ModelSpec

FAILING_RANK = 1


class FailsOnRank(nn.Module):
    """A linear classifier whose forward raises on one rank: a rank that fails mid-training."""

    def __init__(self, n_features: int, n_classes: int, failing_rank: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_features, n_classes)
        self.failing_rank = failing_rank

    def forward(self, x: Tensor) -> Tensor:
        if dist.is_initialized() and dist.get_rank() == self.failing_rank:
            raise RuntimeError(f"synthetic failure on rank {self.failing_rank}")
        return self.linear(x)


def fails_on_rank_one(spec: ModelSpec) -> nn.Module:
    """Model family `tests.distributed_models:fails_on_rank_one`."""
    return FailsOnRank(spec.n_features, spec.n_classes, FAILING_RANK)
