"""The one explicit training loop every cadence uses (scoring a model: `continual.inference`).

`train` counts optimiser steps, not epochs (small batches still get enough updates). The
continual-learning methods plug in as explicit, optional arguments rather than callbacks on a
shared strategy object:

- `replay` + `replay_ratio`: `continual.replay.mix_batch` swaps that share of every mini-batch
  for buffer samples, so old and new examples share one forward pass;
- `distiller`: `distiller.loss(inputs, student_logits, task_loss)` replaces the task loss
  (`continual.distillation`: the LwF mix for classifiers, next-token loss + w·per-token KL to
  the previous champion for causal LMs);
- `ewc`: applied as its `mode` says. "proximal" (default): `ewc.proximal_step_(model, lr)`
  right after `optimizer.step()`, the closed-form proximal step of the penalty with the step's
  learning rate, so AdamW never rescales it and clipping never sees it. "gradient":
  `ewc.add_penalty_grad_(model)` adds 2λF̂(θ−θ*) after backward, before clipping.

On CPU a fixed seed gives identical losses run after run. What a GPU user expects, each opt-in
or automatic (`TrainSettings`, the `train` section of the config; docs/SCALING.md):

- `grad_accum_steps` k: each optimiser step's batch (`batch_size` rows, replay already mixed
  in) runs as k micro-batches whose losses are weighted by their share of the batch (rows, or
  predicted tokens for a causal LM) — the same gradient as the whole batch in one pass, with
  a k-th of the activation memory. Clipping, the divergence checks and the EWC penalty see
  the accumulated gradient, once per optimiser step; steps (and checkpoints) count optimiser
  steps.
- `precision`: "auto" runs the forward pass under bf16 autocast on a CUDA device that supports
  it, fp32 elsewhere; "bf16" asks for autocast on any device (CPU autocast on CPU); "fp32"
  never. Parameters, gradients, optimiser state, losses, Fisher squares and the EWC terms
  stay float32.
- `compile`: the training forward runs through `torch.compile(model)`; a compilation that
  fails falls back to the plain model with a logged warning.
- `gradient_checkpointing`: a Hugging Face model inside `model` recomputes its activations in
  the backward pass (non-reentrant, so LoRA gets gradients without `enable_input_require_grads`);
  switched off again when the run ends.
- `sync_every` N: losses and gradient norms stay on the device and are read back every N
  steps (auto: 1 on CPU, where reading is free, 16 on a GPU), which is when the divergence
  check runs and `on_step` hears of those steps. With N > 1 a non-finite loss or exploding
  gradient is still reported at the step it happened, but up to N − 1 later steps may already
  have been applied to the (discarded) copy being trained.

Learning-rate schedule (`lr_schedule`, `warmup_steps`, `min_lr_ratio`): "constant" (the default)
keeps `lr` after an optional linear warm-up; "cosine" warms up linearly over `warmup_steps`, then
decays along a half cosine to `min_lr_ratio` × `lr` at the last step. The rate is a function of
the step alone (`lr_at`), so a resumed run continues on the same curve without a scheduler state.
Each run (bootstrap or update) is one warm-up and one decay: an update of a decayed model
re-warms to its own `lr` and decays again, the continual pre-training recipe (docs/CAUSAL_LM.md).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from continual.acceleration import (
    PRECISIONS,
    Precision,
    TrainingForward,
    activation_checkpointing,
    autocast_dtype,
)
from continual.batching import BatchStream, epoch_batches, length_grouped_batches
from continual.divergence import DivergenceWatch
from continual.inference import pad_token_id
from continual.resume import Checkpointing, LoopState

if TYPE_CHECKING:
    from continual.distillation import Distiller, TokenDistiller
    from continual.ewc import EWC
    from continual.replay import ReservoirBuffer

log = logging.getLogger(__name__)
LRSchedule = Literal["constant", "cosine"]
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")
GPU_SYNC_EVERY = 16  # steps between read-backs of losses / gradient norms on an accelerator


@dataclass
class TrainSettings:
    """Optimisation settings of one training run.

    Attributes:
        steps: optimiser steps (not epochs).
        batch_size: examples per step (new + replayed).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        seed: seeds batch order, dropout and replay sampling.
        max_grad_norm: clip the total gradient norm to this (None: no clipping).
        abort_grad_norm: a total gradient norm above this (before clipping) means the run has
            diverged: clipping would hide it, so training stops with `TrainingDivergedError`.
        grad_accum_steps: micro-batches per optimiser step (the step's `batch_size` rows are
            split k ways; same update, a k-th of the activation memory).
        precision: "auto" (bf16 autocast on a CUDA device that supports it, else fp32), "bf16"
            (autocast on any device; refused on a GPU without bf16), "fp32".
        compile: run the training forward through `torch.compile` (falls back on failure).
        gradient_checkpointing: recompute a Hugging Face model's activations in backward.
        sync_every: read losses and gradient norms back to the host every this many steps
            (0: auto, 1 on CPU and 16 on an accelerator); the divergence abort may then come
            up to N − 1 steps after the bad step.
        lr_schedule: "constant" (`lr` after the warm-up) or "cosine" (warm-up, then a half
            cosine from `lr` down to `min_lr_ratio` × `lr` at the last step); see `lr_at`.
        warmup_steps: steps of linear warm-up from lr / warmup_steps to `lr` (0: none).
        min_lr_ratio: the cosine's floor as a share of `lr` (unused by "constant").
    """

    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    max_grad_norm: float | None = 5.0
    abort_grad_norm: float = 1e6
    grad_accum_steps: int = 1
    precision: Precision = "auto"
    compile: bool = False
    gradient_checkpointing: bool = False
    sync_every: int = 0
    lr_schedule: LRSchedule = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(
                f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}"
            )
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(
                f"need lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}"
            )
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if not self.abort_grad_norm > 0:
            raise ValueError(f"abort_grad_norm must be > 0, got {self.abort_grad_norm}")
        if not 1 <= self.grad_accum_steps <= self.batch_size:
            raise ValueError(
                f"grad_accum_steps must be in [1, batch_size={self.batch_size}] (each micro-batch "
                f"needs a row), got {self.grad_accum_steps}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.sync_every < 0:
            raise ValueError(f"sync_every must be >= 0 (0: auto), got {self.sync_every}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0 <= self.warmup_steps < self.steps or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                f"need 0 <= warmup_steps < steps ({self.steps}) and 0 <= min_lr_ratio <= 1, got "
                f"{self.warmup_steps}, {self.min_lr_ratio}"
            )


def lr_at(settings: TrainSettings, step: int) -> float:
    """The learning rate of optimiser step `step` (1-based) of a run with `settings`: linear
    warm-up over `warmup_steps` (step k of it at k / warmup_steps × lr), then `lr` ("constant")
    or a half cosine from `lr` after the warm-up to `min_lr_ratio` × `lr` at the last step."""
    warmup = settings.warmup_steps
    if step <= warmup:
        return settings.lr * step / warmup
    if settings.lr_schedule == "constant":
        return settings.lr
    progress = (step - warmup) / max(1, settings.steps - warmup)
    floor = settings.min_lr_ratio
    return settings.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class TrainResult:
    """What a training run did: per-step losses, timing and volume."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    examples_seen: int = 0
    device: str = "cpu"
    resumed_at: int = 0  # the step a saved state resumed from (0: trained from the start)
    # trainable parameters (CPU copies) after each step of `snapshot_at` the run passed
    snapshots: dict[int, dict[str, Tensor]] = field(default_factory=dict)

    def _window(self) -> int:
        return max(1, len(self.losses) // 10)

    @property
    def first_loss(self) -> float:
        """Mean loss over the first 10% of steps (at least one step)."""
        return float(np.mean(self.losses[: self._window()])) if self.losses else float("nan")

    @property
    def last_loss(self) -> float:
        """Mean loss over the last 10% of steps (at least one step)."""
        return float(np.mean(self.losses[-self._window() :])) if self.losses else float("nan")


def pick_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _index_batches(
    model: nn.Module, X: Tensor, batch_size: int, generator: torch.Generator
) -> BatchStream:
    """Length-grouped batches for token ids of a model with a `pad_token_id`, else plain ones."""
    pad = pad_token_id(model, X)
    if pad is None:
        return BatchStream(lambda g: epoch_batches(len(X), batch_size, g), generator)
    from continual.text import sequence_lengths

    return length_grouped_batches(sequence_lengths(X, pad), batch_size, generator)


def _check_inputs(X: Tensor, y: Tensor) -> None:
    if len(X) == 0:
        raise ValueError("train: X is empty; nothing to train on")
    if len(X) != len(y):
        raise ValueError(f"train: X has {len(X)} rows but y has {len(y)}")
    if y.dtype != torch.long:
        raise ValueError(f"train: y must hold class indices (torch.long), got {y.dtype}")


def _next_batch(
    X: Tensor,
    y: Tensor,
    indices: Tensor,
    replay: ReservoirBuffer | None,
    replay_ratio: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    xb, yb = X[indices], y[indices]
    if replay is not None and replay_ratio > 0 and len(replay) > 0:
        from continual.replay import mix_batch

        xb, yb = mix_batch(xb, yb, replay, replay_ratio, generator)
    return xb, yb


def train(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    settings: TrainSettings,
    *,
    ewc: EWC | None = None,
    replay: ReservoirBuffer | None = None,
    replay_ratio: float = 0.0,
    distiller: Distiller | TokenDistiller | None = None,
    on_step: Callable[[int, float], None] | None = None,
    device: torch.device | str | None = None,
    checkpointing: Checkpointing | None = None,
    snapshot_at: Collection[int] = (),
) -> TrainResult:
    """Train `model` in place for `settings.steps` AdamW steps on mini-batches of (X, y).

    Args:
        model: the model; only parameters with `requires_grad` are optimised (LoRA-friendly).
            May be wrapped in `DistributedDataParallel` (`continual.distributed`).
        X: inputs [N, ...] (features, or token ids for text models), on CPU.
        y: class indices [N] (torch.long).
        settings: steps, batch size, learning rate, seed, clipping.
        ewc: optional EWC penalty, applied as `ewc.mode` says (proximal step after each
            optimiser step, or its gradient added before clipping).
        replay: optional replay buffer, mixed in at `replay_ratio` when it holds examples.
        replay_ratio: share of each batch taken from `replay` (0 disables replay).
        distiller: optional frozen teacher; its `loss` replaces the task loss (cross-entropy,
            or a causal LM's next-token loss).
        on_step: called as on_step(step, loss) after each step (step counts from 1).
        device: where to train (default: `pick_device()`); the model stays there afterwards.
        checkpointing: save the loop's state as it says (`continual.resume`) and, when a state
            saved under the same fingerprint exists, resume from it: the result (weights,
            losses) is the same as that of a run never interrupted. The caller builds the
            fingerprint from everything the run depends on (data, settings, starting weights,
            method state) and removes the file when it no longer needs it.
        snapshot_at: steps after which to keep a CPU copy of the trainable parameters
            (`result.snapshots`), so a caller can score earlier points of the run and keep the
            best (early stopping on held-out rows) without training again. A resumed run has
            none of the steps it did not redo.

    Returns:
        TrainResult with one loss per step (task loss, plus distillation; without the EWC
        penalty), including the steps a resumed run did not redo. The model is left in eval mode.

    Raises:
        ValueError: empty or mismatched inputs, non-integer labels, no trainable parameter.
    """
    _check_inputs(X, y)
    if not 0 <= replay_ratio < 1:
        raise ValueError(f"replay_ratio must be in [0, 1), got {replay_ratio}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train: the model has no trainable parameter (all requires_grad=False)")
    device = torch.device(device) if device is not None else pick_device()
    amp = autocast_dtype(settings.precision, device)
    model.to(device)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    generator = torch.Generator().manual_seed(settings.seed)
    result = TrainResult(device=str(device))
    started = time.perf_counter()
    cuda = [device.index or 0] if device.type == "cuda" else []
    # Under DDP the penalty addresses the wrapped module's parameter names.
    core = model.module if isinstance(model, DistributedDataParallel) else model
    forward = TrainingForward(model, compile=settings.compile)
    watch = DivergenceWatch(settings.abort_grad_norm)
    sync_every = settings.sync_every or (1 if device.type == "cpu" else GPU_SYNC_EVERY)
    model.train()
    with (
        torch.random.fork_rng(devices=cuda),  # seeds dropout without leaking global RNG state
        activation_checkpointing(core, settings.gradient_checkpointing),
    ):
        torch.manual_seed(settings.seed)
        batches = _index_batches(model, X, settings.batch_size, generator)
        loop = LoopState(model, optimizer, generator, batches, cuda, result)
        if checkpointing is not None:
            loop.resume(checkpointing, settings.steps)
        for step in range(result.resumed_at + 1, settings.steps + 1):
            xb, yb = _next_batch(X, y, next(batches), replay, replay_ratio, generator)
            optimizer.zero_grad(set_to_none=True)
            loss = _forward_backward(
                forward, model, core, xb, yb, settings.grad_accum_steps, distiller, amp, device
            )
            watch.add(step, loss, _clip(params, settings, ewc=ewc, model=core))
            save = checkpointing is not None and checkpointing.due(step, settings.steps)
            # Read back (and check: raises before this step is applied) on the sync cadence.
            done = watch.drain() if save or step % sync_every == 0 or step == settings.steps else []
            scale = lr_at(settings, step) / settings.lr  # each group keeps its own base rate
            for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base_lr * scale
            optimizer.step()
            if ewc is not None and ewc.mode == "proximal":
                ewc.proximal_step_(core, optimizer.param_groups[0]["lr"])
            result.examples_seen += len(yb)
            if step in snapshot_at:
                result.snapshots[step] = trainable_copy(core)
            result.losses += [value for _, value in done]
            if save and checkpointing is not None:
                loop.save(checkpointing, step, settings.steps, time.perf_counter() - started)
            if on_step is not None:
                for at, value in done:
                    on_step(at, value)
    model.eval()
    result.steps = settings.steps
    result.seconds += time.perf_counter() - started
    return result


def trainable_copy(model: nn.Module) -> dict[str, Tensor]:
    """CPU copies of the parameters that train (a LoRA model: its adapters only)."""
    return {
        name: p.detach().to("cpu", copy=True)
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def load_trainable_(model: nn.Module, snapshot: dict[str, Tensor]) -> None:
    """Put a `trainable_copy` back into `model` (in place, on the model's device)."""
    parameters = dict(model.named_parameters())
    missing = sorted(set(snapshot) - set(parameters))
    if missing:
        raise KeyError(f"the snapshot names parameters the model lacks: {missing[:5]}")
    with torch.no_grad():
        for name, value in snapshot.items():
            parameters[name].copy_(value)


def _micro_batches(
    model: nn.Module, xb: Tensor, yb: Tensor, k: int
) -> list[tuple[Tensor, Tensor, float]]:
    """The batch cut into up to k micro-batches, each with its share of the batch's loss.

    The share is the micro-batch's share of what the loss averages over: rows for a
    classifier, predicted (non-pad) tokens for a causal LM — so the weighted sum of the
    micro-batch losses is the whole batch's loss, and its gradient the whole batch's gradient.
    Computed on the host copy of the batch: no device sync.
    """
    if k == 1 or len(xb) == 1:
        return [(xb, yb, 1.0)]
    chunks = [c for c in torch.tensor_split(torch.arange(len(xb)), k) if len(c)]
    pad = pad_token_id(model, xb)
    if pad is not None and xb.shape[1] > 1:
        real = xb != pad
        counts = [float((real[c, 1:] & real[c, :-1]).sum()) for c in chunks]
    else:
        counts = [float(len(c)) for c in chunks]
    total = sum(counts)
    if total == 0:  # nothing to predict anywhere: keep the batch whole (its loss says so)
        return [(xb, yb, 1.0)]
    return [(xb[c], yb[c], n / total) for c, n in zip(chunks, counts, strict=True) if n > 0]


def _forward_backward(
    forward: Callable[[Tensor], Tensor],
    model: nn.Module,
    core: nn.Module,
    xb: Tensor,
    yb: Tensor,
    k: int,
    distiller: Distiller | TokenDistiller | None,
    amp: torch.dtype | None,
    device: torch.device,
) -> Tensor:
    """Forward and backward of one optimiser step's batch in up to k micro-batches; the
    step's loss (task loss plus distillation, the micro-batches' weighted sum), on the device.

    Under DDP (`model` the wrapper, `core` the module inside) only the last micro-batch's
    backward all-reduces the gradients.
    """
    parts = _micro_batches(core, xb, yb, k)
    total: Tensor | None = None
    for index, (x, y, share) in enumerate(parts):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        last = index == len(parts) - 1
        quiet = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else None
        with quiet or nullcontext():
            # A disabled autocast still costs ~8 µs to enter: none at all in fp32.
            with nullcontext() if amp is None else torch.autocast(device.type, dtype=amp):
                logits = forward(x)
                loss = task_loss(core, logits, x, y)
                if distiller is not None:
                    loss = distiller.loss(x, logits.float(), loss)
            scaled = loss if len(parts) == 1 else loss * share
            scaled.backward()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        part = scaled.detach()
        total = part if total is None else total + part
    assert total is not None
    return total


def task_loss(model: nn.Module, logits: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
    """Cross-entropy of the labels; for a causal LM (logits [N, L, V]) the next-token loss of
    the token ids themselves, padding masked (`continual.causal_lm`; its labels are unused).
    The one loss of every gradient step: the training loop's and the stream's online SGD."""
    if logits.ndim == 3:
        from continual.causal_lm import next_token_loss

        pad = pad_token_id(model, xb)
        if pad is None:
            raise ValueError("train: 3-D logits need token-id inputs and a model pad_token_id")
        return next_token_loss(logits, xb, pad)
    return F.cross_entropy(logits.float(), yb)


def _clip(
    params: list[nn.Parameter],
    settings: TrainSettings,
    *,
    ewc: EWC | None,
    model: nn.Module,
) -> Tensor:
    """Add a "gradient"-mode EWC penalty and clip; the total norm of the task gradient (before
    the penalty and the clipping), left on the device for `DivergenceWatch`.

    The divergence check sees the task gradient only: a strong EWC pull is intended, not a
    divergence.
    """
    clip = settings.max_grad_norm if settings.max_grad_norm is not None else float("inf")
    if ewc is not None and ewc.mode == "gradient":
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        ewc.add_penalty_grad_(model)
        torch.nn.utils.clip_grad_norm_(params, clip)
        return norm
    return torch.nn.utils.clip_grad_norm_(params, clip)
