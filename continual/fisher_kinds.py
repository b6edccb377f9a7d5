"""What the diagonal Fisher of each kind is: its backward vectors at the logits, per example.

Every kind ("empirical", "true", "sampled"; "auto" picks one, see `continual.fisher`) is a set
of K backward vectors v at the logits per example, and F = (1/N) Σ_n Σ_k (J_nᵀ v_nk)² with
J = ∂z/∂θ: empirical: ∂ℓ/∂z at y; true: a factor of Σ_c p_c (∂ℓ(z, c)/∂z)(·)ᵀ — for
cross-entropy diag(p) − ppᵀ, C − 1 vectors; sampled: ∂ℓ(z, ŷ_s)/∂z / √S. Also the argument
checks and set-up shared by `continual.fisher` and `continual.fisher_reference`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad

from continual.models import as_logits

LossFn = Callable[[Tensor, Tensor], Tensor]
FisherKind = Literal["auto", "empirical", "true", "sampled"]
EstimatedKind = Literal["empirical", "true", "sampled"]  # what "auto" resolves to
FISHER_KINDS: tuple[str, ...] = ("auto", "empirical", "true", "sampled")
TRUE_FISHER_MAX_CLASSES = 16  # "auto": exact expectation up to this many classes, else sampled


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """The default loss: per-example cross-entropy (reduction="none")."""
    return F.cross_entropy(logits, target, reduction="none")


def example_losses(loss_fn: LossFn, output: object, target: Tensor) -> Tensor:
    """`loss_fn` on a model output's logits, checked to give one loss per example.

    Raises:
        ValueError: the loss is not of shape [B].
    """
    losses = loss_fn(as_logits(output), target)
    if losses.shape != (target.shape[0],):
        raise ValueError(
            f"loss_fn must return one loss per example (shape [{target.shape[0]}]), got shape "
            f"{tuple(losses.shape)}: use reduction='none'"
        )
    return losses


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype squares are summed in: float32 at least (bf16/fp16 sums lose mass)."""
    return torch.promote_types(dtype, torch.float32)


def square(g: Tensor) -> Tensor:
    """g² in the accumulator dtype."""
    return g.to(accumulator_dtype(g.dtype)).square()


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: parameter} of every parameter with requires_grad, in `named_parameters()` order.

    Raises:
        ValueError: the model has none.
    """
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True")
    return trainable


def check_args(X: Tensor, y: Tensor, kind: str, n_samples: int) -> None:
    """Validate the data and kind arguments shared by the Fisher estimators.

    Raises:
        ValueError: empty or mismatched X/y, unknown kind, or n_samples < 1.
    """
    if X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise ValueError(
            f"X and y need the same, non-zero number of rows; got {X.shape[0]} and {y.shape[0]}"
        )
    if kind not in FISHER_KINDS:
        raise ValueError(f"unknown Fisher kind {kind!r}; expected one of {FISHER_KINDS}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the estimate; afterwards every submodule gets its own previous mode back."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode


def resolve_kind(
    kind: str, model: nn.Module, x: Tensor, n_samples: int, loss_fn: LossFn
) -> tuple[EstimatedKind, int]:
    """The kind ("auto": "true" up to TRUE_FISHER_MAX_CLASSES logits, else "sampled") and K,
    the number of backward vectors per example; `kind` was validated by `check_args`."""
    with torch.no_grad():
        classes = as_logits(model(x)).shape[-1]
    if kind == "auto":
        kind = "true" if classes <= TRUE_FISHER_MAX_CLASSES else "sampled"
    if kind == "true":
        return "true", classes - 1 if _factorised(loss_fn, classes) else classes
    if kind == "empirical":
        return "empirical", 1
    return "sampled", n_samples


def _factorised(loss_fn: LossFn, classes: int) -> bool:
    """Cross-entropy's true Fisher at the logits, diag(p) − ppᵀ, has rank C − 1."""
    return loss_fn is cross_entropy and classes >= 2


def _multinomial_factor(p: Tensor) -> Tensor:
    """V [C−1, B, C] with Σ_k v_k v_kᵀ = diag(p) − ppᵀ = Σ_c p_c (p − e_c)(p − e_c)ᵀ.

    Sequential conditioning of the one-hot label (is it class k, given it is none before k?):
    v_k = √(p_k·s_{k+1}/s_k)·(e_k − Σ_{j>k} p_j e_j / s_{k+1}), s_k = Σ_{j≥k} p_j.
    """
    classes = p.shape[-1]
    tail = p.flip(-1).cumsum(-1).flip(-1)  # s_k from the small end: no cancellation
    here, after = tail[:, :-1], tail[:, 1:]
    tiny = torch.finfo(p.dtype).tiny
    weight = (p[:, :-1] * after / here.clamp_min(tiny)).sqrt()
    later = torch.ones(classes, classes, dtype=p.dtype, device=p.device).triu(1)[:-1]
    rest = p.unsqueeze(1) * later / after.clamp_min(tiny).unsqueeze(-1)
    eye = torch.eye(classes, dtype=p.dtype, device=p.device)[:-1]
    return (weight.unsqueeze(-1) * (eye - rest)).transpose(0, 1)


def label_draws(n: int, kind: str, n_samples: int, seed: int) -> Tensor:
    """Uniforms [N, S] for the sampled labels, fixed per example whatever the batching."""
    if kind != "sampled":
        return torch.zeros(n, 1)
    return torch.rand(n, n_samples, generator=torch.Generator().manual_seed(seed))


def sample_labels(p: Tensor, u: Tensor) -> Tensor:
    """Labels [B, S] drawn from p [B, C] by inverse CDF of the uniforms u [B, S]; vmap-safe."""
    below = p.cumsum(-1).unsqueeze(-2) < u.unsqueeze(-1)
    return below.sum(-1).clamp(max=p.shape[-1] - 1)


def _loss_grads(loss_fn: LossFn, z: Tensor, targets: Tensor) -> Tensor:
    """∂ℓ(z_n, t_n)/∂z_n per row (a per-example loss depends on its own row only)."""
    if loss_fn is cross_entropy and z.dim() == 2:  # closed form, no autograd call
        return torch.softmax(z, dim=-1) - F.one_hot(targets, z.shape[-1]).to(z.dtype)
    grads: Tensor = grad(lambda logits: example_losses(loss_fn, logits, targets).sum())(z)
    return grads


def backward_vectors(kind: str, loss_fn: LossFn, z: Tensor, y: Tensor, u: Tensor) -> Tensor:
    """Backward vectors [K, B, C] at the logits z [B, C]: F = Σ_n Σ_k (J_nᵀ v_nk)²."""
    z = z.detach().to(accumulator_dtype(z.dtype))
    if kind == "empirical":
        return _loss_grads(loss_fn, z, y).unsqueeze(0)
    if z.dim() != 2:
        raise ValueError(f"Fisher kind {kind!r} needs logits [B, C], got {tuple(z.shape)}")
    batch, classes = z.shape
    p = torch.softmax(z, dim=-1)
    if kind == "true" and _factorised(loss_fn, classes):
        return _multinomial_factor(p)
    if kind == "true":  # Σ_c p_c g_c² = Σ_c (√p_c g_c)²
        labels = torch.arange(classes, device=z.device).unsqueeze(1).expand(classes, batch)
        weights = p.t().sqrt()
    else:
        labels = sample_labels(p, u.to(z.device)).t()
        weights = torch.full(labels.shape, labels.shape[0] ** -0.5, dtype=z.dtype, device=z.device)
    k = labels.shape[0]
    rows = z.unsqueeze(0).expand(k, batch, classes).reshape(k * batch, classes)
    g = _loss_grads(loss_fn, rows, labels.reshape(-1)).view(k, batch, classes)
    return g * weights.unsqueeze(-1)
