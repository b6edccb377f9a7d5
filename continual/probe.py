"""Linear probing before fine-tuning (LP-FT): fit the classification head on frozen features first.

Why: a text champion's head has only ever seen the classes of its own batches; its logits for a
class that arrives later are pushed far down. Fine-tuning the encoder with that head starts at a
cross-entropy of 2.5-3.6 on the new rows, and those large first gradients, through Adam without
warm-up, rewrite the encoder in a few steps: on the text timeline a weekly update took retention
from 0.905 to 0.452, the model answering the newly arrived class for old rows. Fitting the head
first on frozen features (old rows and new) makes the starting loss small, so the fine-tune
adapts the features instead of distorting them (Kumar et al. 2022, "Fine-Tuning can Distort
Pretrained Features and Underperform Out-of-Distribution").

The probe runs on cached features: one forward pass of the encoder over the rows, then
full-batch AdamW steps on the Linear head alone, a fraction of a second for hundreds of rows.
It applies to models that expose `features(X)` and a Linear `classifier` reading them
(`continual.models.HFTextClassifier`); other models are left untouched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROBE_STEPS = 200
PROBE_LR = 1e-2
_FEATURE_BATCH = 128  # rows per encoder pass (attention memory grows with rows x length^2)


@dataclass(frozen=True)
class ProbeResult:
    """What the probe did: full-batch steps, the head's loss before and after, wall time."""

    steps: int
    first_loss: float
    last_loss: float
    seconds: float


def has_probe_head(model: nn.Module) -> bool:
    """Whether `model` exposes `features(X)` and a Linear `classifier` the probe can fit."""
    return callable(getattr(model, "features", None)) and isinstance(
        getattr(model, "classifier", None), nn.Linear
    )


@torch.no_grad()
def head_features(model: nn.Module, X: Tensor) -> Tensor:
    """The head's inputs [N, hidden] for X, in eval mode, by length-sorted batches (text)."""
    from continual.text import inverse_order, length_order

    model.eval()
    device = next(model.parameters()).device
    pad = getattr(model, "pad_token_id", None)
    order = length_order(X, pad) if isinstance(pad, int) and not X.is_floating_point() else None
    rows = X if order is None else X[order]
    chunks = [
        model.features(rows[i : i + _FEATURE_BATCH].to(device)).float()  # type: ignore[operator]
        for i in range(0, len(rows), _FEATURE_BATCH)
    ]
    features = torch.cat(chunks)
    return features if order is None else features[inverse_order(order).to(features.device)]


def probe_head_(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    *,
    steps: int = PROBE_STEPS,
    lr: float = PROBE_LR,
    weight_decay: float = 1e-4,
) -> ProbeResult:
    """Fit `model.classifier` in place on the frozen features of (X, y); nothing else changes.

    Args:
        model: a model with `has_probe_head(model)`.
        X: inputs [N, ...] (token ids for a text model); should hold rows of every class the
            head must keep (new rows and replayed old ones), or the probe forgets the rest.
        y: class indices [N] (torch.long).
        steps: full-batch AdamW steps on the head.
        lr: the head's learning rate (a linear model on fixed features takes a large one).
        weight_decay: AdamW weight decay of the head.

    Raises:
        ValueError: the model has no probe head, or X is empty / does not match y.
    """
    if not has_probe_head(model):
        raise ValueError("probe_head_: the model exposes no features() + Linear classifier")
    if len(X) == 0 or len(X) != len(y):
        raise ValueError(f"probe_head_: need matching non-empty X, y; got {len(X)}, {len(y)}")
    started = time.perf_counter()
    head: nn.Linear = model.classifier  # type: ignore[assignment]
    features = head_features(model, X)
    target = y.to(features.device)
    weight = head.weight.detach().clone().float().requires_grad_(True)
    bias = None if head.bias is None else head.bias.detach().clone().float().requires_grad_(True)
    params = [p for p in (weight, bias) if p is not None]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(F.linear(features, weight, bias), target)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight.dtype))
        if head.bias is not None and bias is not None:
            head.bias.copy_(bias.to(head.bias.dtype))
        final = float(F.cross_entropy(F.linear(features, weight, bias), target))
    return ProbeResult(
        steps=steps,
        first_loss=losses[0] if losses else final,
        last_loss=final,
        seconds=time.perf_counter() - started,
    )
