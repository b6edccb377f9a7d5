"""Streaming: an EMA teacher of the weights (the drift statistics are in `continual.drift`).

The EMA teacher smooths an online learner's weights (θ_ema ← d·θ_ema + (1−d)·θ): the student
adapts to single samples, the teacher is what the stream monitor scores and serves. d = 0.999
tracks slow drift, 0.99 fast shifts; much lower destabilises.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn


class EMATeacher:
    """A frozen exponential moving average of a model's weights.

    Args:
        model: the student; deep-copied, so later changes to it reach the teacher only via update().
        decay: d in θ_ema ← d·θ_ema + (1−d)·θ, in [0, 1] (0 copies, 1 freezes).

    Raises:
        ValueError: decay outside [0, 1].
    """

    def __init__(self, model: nn.Module, decay: float = 0.99) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        # fp32 master copies of low-precision parameters: in bf16 a step of (1−d)·(θ − θ_ema)
        # is usually below half a unit in the last place, so rounding after every update
        # would freeze the teacher; the masters accumulate, the module gets their rounding.
        self._masters: dict[str, Tensor] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the teacher towards `model`: lerp on float parameters, copy of everything else.

        The lerp is done in fp32 even for bf16/fp16 parameters, on fp32 master copies kept by
        the teacher (see `_masters`); the module holds their rounding to its own dtype.
        Buffers (e.g. BatchNorm running statistics) are copied, not averaged: they are already
        running estimates, and copying keeps them consistent with the inputs the student sees.

        Raises:
            ValueError: `model` does not have the teacher's parameter/buffer names and shapes.
        """
        params = _matched(self.module.named_parameters(), model.named_parameters(), "parameter")
        targets, sources, low_precision = [], [], []
        for name, t, s in params:
            if not t.is_floating_point():
                t.copy_(s)
            elif t.dtype in _LOW_PRECISION:
                if name not in self._masters:
                    self._masters[name] = t.float()
                targets.append(self._masters[name])
                sources.append(s.detach().float())
                low_precision.append((t, self._masters[name]))
            else:
                targets.append(t)
                sources.append(s.detach().to(t.dtype))
        if targets:
            torch._foreach_lerp_(targets, sources, 1.0 - self.decay)
        for t, master in low_precision:
            t.copy_(master)
        for _, t, s in _matched(self.module.named_buffers(), model.named_buffers(), "buffer"):
            t.copy_(s)

    def state_dict(self) -> dict[str, Tensor]:
        """The teacher's weights (a regular module state dict)."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore the teacher's weights (strict); fp32 masters restart from them."""
        self.module.load_state_dict(state)
        self._masters.clear()


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _matched(
    teacher: Iterable[tuple[str, Tensor]], student: Iterable[tuple[str, Tensor]], kind: str
) -> list[tuple[str, Tensor, Tensor]]:
    ours, theirs = dict(teacher), dict(student)
    if ours.keys() != theirs.keys():
        only_ours = sorted(ours.keys() - theirs.keys())[:5]
        only_theirs = sorted(theirs.keys() - ours.keys())[:5]
        raise ValueError(
            f"EMA update: {kind} names differ; only in teacher {only_ours}, "
            f"only in model {only_theirs} — is this the same architecture?"
        )
    pairs = []
    for name, tensor in ours.items():
        if tensor.shape != theirs[name].shape:
            raise ValueError(
                f"EMA update: {kind} {name!r} is {list(tensor.shape)} in the teacher but "
                f"{list(theirs[name].shape)} in the model"
            )
        pairs.append((name, tensor, theirs[name]))
    return pairs
