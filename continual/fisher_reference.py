"""The brute-force reference Fisher: one autograd pass per example and label (tests, benchmarks)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from continual.fisher_kinds import (
    FisherKind,
    LossFn,
    accumulator_dtype,
    check_args,
    cross_entropy,
    eval_mode,
    example_losses,
    label_draws,
    resolve_kind,
    sample_labels,
    trainable_parameters,
)
from continual.models import as_logits


def brute_force_fisher(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    loss_fn: LossFn | None = None,
    *,
    kind: FisherKind = "auto",
    n_samples: int = 1,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Reference Fisher: one autograd pass per example and label, square, weight, average.

    Same arguments and meaning as `diagonal_fisher` ("sampled" draws the same labels for the same
    seed); the expectation of "true" is taken literally, Σ_c p_c·g_c². Slow; for tests/bench.
    """
    check_args(X, y, kind, n_samples)
    loss_fn = loss_fn or cross_entropy
    trainable = trainable_parameters(model)
    device = next(iter(trainable.values())).device
    names, params = list(trainable), list(trainable.values())
    total = [torch.zeros_like(p, dtype=accumulator_dtype(p.dtype)) for p in params]
    with eval_mode(model):
        kind, _ = resolve_kind(kind, model, X[:1].to(device), n_samples, loss_fn)
        draws = label_draws(X.shape[0], kind, n_samples, seed)
        for n in range(X.shape[0]):
            z = as_logits(model(X[n : n + 1].to(device)))
            p = torch.softmax(z.detach().to(accumulator_dtype(z.dtype)), dim=-1)
            if kind == "empirical":
                labels, weights = y[n : n + 1].to(device), torch.ones(1, dtype=p.dtype)
            elif kind == "true":
                labels, weights = torch.arange(p.shape[-1], device=device), p[0]
            else:
                labels = sample_labels(p, draws[n : n + 1].to(device))[0]
                weights = torch.full(labels.shape, 1.0 / n_samples, dtype=p.dtype)
            for label, weight in zip(labels, weights, strict=True):
                loss = example_losses(loss_fn, z, label.view(1)).sum()
                grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                for acc, g in zip(total, grads, strict=True):
                    if g is not None:
                        acc += weight.to(acc.device) * g.to(acc.dtype).square()
    return {name: acc / X.shape[0] for name, acc in zip(names, total, strict=True)}
