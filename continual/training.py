"""The one explicit training loop every cadence uses, and the evaluation helpers around it.

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

On CPU a fixed seed gives identical losses run after run; on CUDA the forward pass runs under
bf16 autocast.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from continual.batching import BatchStream, epoch_batches, length_grouped_batches
from continual.resume import Checkpointing, LoopState

if TYPE_CHECKING:
    from continual.distillation import Distiller, TokenDistiller
    from continual.ewc import EWC
    from continual.replay import ReservoirBuffer


class TrainingDivergedError(RuntimeError):
    """Training produced a non-finite loss or an exploding gradient; the run must stop.

    Raised before the optimiser step that would have applied it, so the model holds the last
    finite parameters. Callers train a copy (the champion is never touched): they drop it.
    """


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
    """

    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    max_grad_norm: float | None = 5.0
    abort_grad_norm: float = 1e6

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


@dataclass
class TrainResult:
    """What a training run did: per-step losses, timing and volume."""

    losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    examples_seen: int = 0
    device: str = "cpu"
    resumed_at: int = 0  # the step a saved state resumed from (0: trained from the start)

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


_TEXT_BATCH = 128  # most rows per inference pass of a text model


def _index_batches(
    model: nn.Module, X: Tensor, batch_size: int, generator: torch.Generator
) -> BatchStream:
    """Length-grouped batches for token ids of a model with a `pad_token_id`, else plain ones."""
    pad = _pad_token_id(model, X)
    if pad is None:
        return BatchStream(lambda g: epoch_batches(len(X), batch_size, g), generator)
    from continual.text import sequence_lengths

    return length_grouped_batches(sequence_lengths(X, pad), batch_size, generator)


def _pad_token_id(model: nn.Module, X: Tensor) -> int | None:
    """The pad id when X holds right-padded token ids [N, L] for a text model, else None."""
    if X.ndim != 2 or X.is_floating_point():
        return None
    pad = getattr(model, "pad_token_id", None)  # peft wrappers forward attribute lookups
    return pad if isinstance(pad, int) else None


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
    model.to(device)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    result = TrainResult(device=str(device))
    started = time.perf_counter()
    cuda = [device.index or 0] if device.type == "cuda" else []
    # Under DDP the penalty addresses the wrapped module's parameter names.
    core = model.module if isinstance(model, DistributedDataParallel) else model
    model.train()
    with torch.random.fork_rng(devices=cuda):  # seeds dropout without leaking global RNG state
        torch.manual_seed(settings.seed)
        batches = _index_batches(model, X, settings.batch_size, generator)
        loop = LoopState(model, optimizer, generator, batches, cuda, result)
        if checkpointing is not None:
            loop.resume(checkpointing, settings.steps)
        for step in range(result.resumed_at + 1, settings.steps + 1):
            xb, yb = _next_batch(X, y, next(batches), replay, replay_ratio, generator)
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(xb)
                loss = task_loss(model, logits, xb, yb)
                if distiller is not None:
                    loss = distiller.loss(xb, logits.float(), loss)
            _check_loss(loss, step)
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
            _clip_checked(params, settings, step, ewc=ewc, model=core)
            optimizer.step()
            if ewc is not None and ewc.mode == "proximal":
                ewc.proximal_step_(core, optimizer.param_groups[0]["lr"])
            result.losses.append(float(loss.detach()))
            result.examples_seen += len(yb)
            if checkpointing is not None and checkpointing.due(step, settings.steps):
                loop.save(checkpointing, step, settings.steps, time.perf_counter() - started)
            if on_step is not None:
                on_step(step, result.losses[-1])
    model.eval()
    result.steps = settings.steps
    result.seconds += time.perf_counter() - started
    return result


def task_loss(model: nn.Module, logits: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
    """Cross-entropy of the labels; for a causal LM (logits [N, L, V]) the next-token loss of
    the token ids themselves, padding masked (`continual.causal_lm`; its labels are unused).
    The one loss of every gradient step: the training loop's and the stream's online SGD."""
    if logits.ndim == 3:
        from continual.causal_lm import next_token_loss

        pad = _pad_token_id(model, xb)
        if pad is None:
            raise ValueError("train: 3-D logits need token-id inputs and a model pad_token_id")
        return next_token_loss(logits, xb, pad)
    return F.cross_entropy(logits.float(), yb)


def _check_loss(loss: Tensor, step: int) -> None:
    """Raise TrainingDivergedError on a NaN/inf loss (bad inputs, a too-high learning rate)."""
    value = float(loss.detach())
    if not np.isfinite(value):
        raise TrainingDivergedError(
            f"training diverged at step {step}: the loss is {value} (check the learning rate "
            "and the batch's values; the champion is unchanged)"
        )


def _clip_checked(
    params: list[nn.Parameter],
    settings: TrainSettings,
    step: int,
    *,
    ewc: EWC | None,
    model: nn.Module,
) -> None:
    """Check the task gradient for divergence, add a "gradient"-mode EWC penalty, then clip.

    The check sees the task gradient only: a strong EWC pull is intended, not a divergence.
    """
    clip = settings.max_grad_norm if settings.max_grad_norm is not None else float("inf")
    if ewc is not None and ewc.mode == "gradient":
        grads = [p.grad for p in params if p.grad is not None]
        _check_grad_norm(
            float(torch.nn.utils.get_total_norm(grads)), settings.abort_grad_norm, step
        )
        ewc.add_penalty_grad_(model)
        torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        _check_grad_norm(norm, settings.abort_grad_norm, step)


def _check_grad_norm(norm: float, limit: float, step: int) -> None:
    """Raise TrainingDivergedError on a non-finite or exploding total gradient norm."""
    if not np.isfinite(norm) or norm > limit:
        raise TrainingDivergedError(
            f"training diverged at step {step}: the gradient norm is {norm:.3g} (limit "
            f"{limit:.3g}); lower the learning rate or check the batch's values — the champion "
            "is unchanged"
        )


def _model_device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def predict_logits(model: nn.Module, X: Tensor, *, batch_size: int = 1024) -> Tensor:
    """Logits [N, C] as a CPU float tensor; the model is put in eval mode.

    Args:
        model: the model, on any device (inputs are moved to it).
        X: inputs [N, ...].
        batch_size: rows per forward pass.
    """
    model.eval()
    device = _model_device(model)
    pad = _pad_token_id(model, X)
    order = None
    if pad is not None:  # token ids: forward passes of similar length (continual.text)
        from continual.text import inverse_order, length_order

        order = length_order(X, pad)
        X = X[order]
        batch_size = min(batch_size, _TEXT_BATCH)  # attention memory grows with rows × length²
    chunks = [
        model(X[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(X), batch_size)
    ]
    if not chunks:
        raise ValueError("predict_logits: X is empty")
    logits = torch.cat(chunks)
    return logits if order is None else logits[inverse_order(order)]


def predict_proba(model: nn.Module, X: Tensor, *, batch_size: int = 1024) -> Tensor:
    """Class probabilities [N, C] (softmax of the logits), CPU float."""
    return torch.softmax(predict_logits(model, X, batch_size=batch_size), dim=-1)


def correct_mask(model: nn.Module, X: Tensor, y: Tensor, *, batch_size: int = 1024) -> np.ndarray:
    """Boolean array [N]: whether the model's top class is the label (paired gate input)."""
    predicted = predict_logits(model, X, batch_size=batch_size).argmax(dim=-1)
    return (predicted == y.cpu()).numpy()


def row_scores(model: nn.Module, X: Tensor, y: Tensor) -> np.ndarray:
    """The per-row score the gate and every keep/discard check compare (higher is better):
    correctness (0/1) of a classifier, the mean token log-likelihood of a causal LM."""
    from continual.causal_lm import is_causal_lm, token_log_likelihood

    if is_causal_lm(model):
        return token_log_likelihood(model, X)
    return correct_mask(model, X, y)


def accuracy(model: nn.Module, X: Tensor, y: Tensor, *, batch_size: int = 1024) -> float:
    """Share of examples classified correctly."""
    return float(correct_mask(model, X, y, batch_size=batch_size).mean())


def per_example_loss(
    model: nn.Module, X: Tensor, y: Tensor, *, batch_size: int = 1024
) -> np.ndarray:
    """Cross-entropy per example [N] as float64 (the drift monitor's input stream).

    For a causal LM (logits [N, L, V]) the row's mean next-token NLL over its non-pad targets,
    −`token_log_likelihood`: the same per-row quantity the gate scores, in nats, so a drift in
    it is a drift in log-perplexity. Cross-entropy of [N, L, V] logits against the flow's [N]
    placeholder labels has no meaning (torch refuses the shapes)."""
    from continual.causal_lm import is_causal_lm, token_log_likelihood

    if is_causal_lm(model):
        return -token_log_likelihood(model, X, batch_size=min(batch_size, 64))
    logits = predict_logits(model, X, batch_size=batch_size)
    return F.cross_entropy(logits, y.cpu().long(), reduction="none").double().numpy()
