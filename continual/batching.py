"""Index batches of a training run: epoch after epoch, drawn from the run's seeded generator.

`BatchStream` hands out the batches of one epoch at a time and can say exactly where it stands
(the generator state the epoch was drawn from, and how many of its batches were used), so a
resumed run (`continual.resume`) continues with the very batch an interrupted one would have
taken next.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """One epoch's index batches: a fresh seeded permutation, no repeats within it."""
    size = min(batch_size, n)
    order = torch.randperm(n, generator=generator)
    return [order[start : start + size] for start in range(0, n - size + 1, size)]


LENGTH_POOL = 32  # batches per pool that length grouping sorts within


def length_grouped_epoch(
    lengths: Tensor, batch_size: int, generator: torch.Generator
) -> list[Tensor]:
    """One epoch of index batches of similar length (token ids): a seeded permutation is cut
    into pools of `LENGTH_POOL` batches, each pool sorted by length and cut into batches, and
    the batches shuffled — random like `epoch_batches`, but with little padding."""
    n = len(lengths)
    size = min(batch_size, n)
    order = torch.randperm(n, generator=generator)
    batches: list[Tensor] = []
    for start in range(0, n, size * LENGTH_POOL):
        pool = order[start : start + size * LENGTH_POOL]
        pool = pool[torch.argsort(lengths[pool], descending=True, stable=True)]
        batches += [pool[i : i + size] for i in range(0, len(pool) - size + 1, size)]
    return [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]


class BatchStream:
    """Endless index batches, epoch after epoch, drawn lazily from the run's generator.

    Its state is small and exact: the generator state the current epoch was drawn from and how
    many of its batches were used. A resumed run redraws that epoch from the saved state (on a
    generator of its own) and carries on from the same batch; the next epoch is drawn from the
    run's generator, which is restored separately (replay sampling shares it).
    """

    def __init__(
        self, make_epoch: Callable[[torch.Generator], list[Tensor]], generator: torch.Generator
    ) -> None:
        self._make_epoch = make_epoch
        self._generator = generator
        self._epoch: list[Tensor] = []
        self._epoch_rng: Tensor | None = None
        self._position = 0

    def __next__(self) -> Tensor:
        while self._position >= len(self._epoch):
            self._epoch_rng = self._generator.get_state()
            self._epoch, self._position = self._make_epoch(self._generator), 0
        self._position += 1
        return self._epoch[self._position - 1]

    def state(self) -> dict[str, Any]:
        return {"rng": self._epoch_rng, "position": self._position}

    def restore(self, state: dict[str, Any]) -> None:
        if state["rng"] is None:
            return  # saved before the first batch was drawn
        replay = torch.Generator().set_state(state["rng"])
        self._epoch_rng, self._epoch = state["rng"], self._make_epoch(replay)
        self._position = int(state["position"])


def length_grouped_batches(
    lengths: Tensor, batch_size: int, generator: torch.Generator
) -> BatchStream:
    """Endless batches of similar length (`length_grouped_epoch`, epoch after epoch)."""
    return BatchStream(lambda g: length_grouped_epoch(lengths, batch_size, g), generator)
