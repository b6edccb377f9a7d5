"""Per-example diagonal Fisher: the importance weights behind EWC and Fisher-weighted merges.

Kept apart from `continual.ewc` because estimating the Fisher is the costly, intricate part and
the penalty only consumes its output. The Fisher is the mean of **per-example** squared
gradients: squaring the gradient of a mini-batch mean instead gives roughly F/|B|, which makes λ
silently depend on the batch size. Per-example gradients are cheap for `nn.Linear` (per-example
grad = g aᵀ, so Σ_n grad_n² = (g∘g)ᵀ(a∘a): one matmul per layer, taken from forward hooks and
verified per layer against autograd on a few examples); every other trainable parameter gets
per-sample gradients from `torch.func.vmap(grad(functional_call))`, in chunks so memory stays
bounded.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from continual.models import as_logits

__all__ = ["LossFn", "brute_force_fisher", "diagonal_fisher", "fisher_paths"]

LossFn = Callable[[Tensor, Tensor], Tensor]
_PROBE_EXAMPLES = 3  # odd, so a [T, B, D] layout is unlikely to pass the per-example check
# When a vmap pass is needed anyway, a separate hook pass only pays for one-row Linear layers
# holding at least this share of the Linear multiply-adds (measured in benchmarks/bench_fisher.py).
_HOOK_PASS_SHARE = 0.5


def _cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits, target, reduction="none")


def _example_losses(loss_fn: LossFn, output: object, target: Tensor) -> Tensor:
    losses = loss_fn(as_logits(output), target)
    if losses.shape != (target.shape[0],):
        raise ValueError(
            f"loss_fn must return one loss per example (shape [{target.shape[0]}]), got shape "
            f"{tuple(losses.shape)}: use reduction='none'"
        )
    return losses


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True")
    return trainable


def _check_data(X: Tensor, y: Tensor) -> None:
    if X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise ValueError(
            f"X and y need the same, non-zero number of rows; got {X.shape[0]} and {y.shape[0]}"
        )


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the estimate; afterwards every submodule gets its own previous mode back."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode


@dataclass
class _LinearSite:
    """A plain `nn.Linear` whose trainable weight/bias use the closed-form path."""

    module: nn.Linear
    params: dict[str, str]  # attribute ("weight"/"bias") -> parameter name in the model
    records: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (input, output) per call
    rows: int = 1  # rows per example seen by the layer (T, summed over calls)


def _linear_sites(model: nn.Module, trainable: dict[str, nn.Parameter]) -> dict[str, _LinearSite]:
    """Linear layers eligible for the closed form: stock forward, parameters not shared."""
    name_of = {id(p): n for n, p in trainable.items()}
    uses = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    sites = {}
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or type(mod).forward is not nn.Linear.forward:
            continue
        params = {
            attr: name_of[id(p)]
            for attr, p in mod.named_parameters(recurse=False)
            if attr in ("weight", "bias") and id(p) in name_of and uses[id(p)] == 1
        }
        if params:
            sites[mod_name] = _LinearSite(mod, params)
    return sites


def _run_captured(
    model: nn.Module, sites: dict[str, _LinearSite], x: Tensor, y: Tensor, loss_fn: LossFn
) -> Tensor:
    """Forward pass recording each site's (input, output) per call; returns per-example losses."""
    handles = []
    for site in sites.values():
        site.records = []

        def hook(
            _m: nn.Module, inputs: tuple[Tensor, ...], out: Tensor, s: _LinearSite = site
        ) -> None:
            s.records.append((inputs[0].detach(), out))

        handles.append(site.module.register_forward_hook(hook))
    try:
        return _example_losses(loss_fn, model(x), y)
    finally:
        for handle in handles:
            handle.remove()


def _site_tensors(
    sites: dict[str, _LinearSite], loss: Tensor, batch: int, *, strict: bool = True
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-site activations a [B, T, Din] and output grads g [B, T, Dout], calls joined on T.

    A layer applied to [B, T, D] inputs, or called several times, has per-example grad
    Σ_t g_t a_tᵀ; joining everything on T keeps one formula for all cases. A site whose leading
    dim is not the batch raises (strict) or is left out (probe).
    """
    outputs = [out for site in sites.values() for _, out in site.records]
    grads = torch.autograd.grad(loss, outputs, allow_unused=True) if outputs else ()
    result, i = {}, 0
    for name, site in sites.items():
        acts, outs, batch_first = [], [], True
        for (a, _), g in zip(site.records, grads[i : i + len(site.records)], strict=True):
            if g is not None:
                batch_first = batch_first and a.shape[0] == batch == g.shape[0]
                acts.append(a.reshape(a.shape[0], -1, a.shape[-1]))
                outs.append(g.reshape(g.shape[0], -1, g.shape[-1]))
        i += len(site.records)
        site.records = []
        if not batch_first and strict:
            raise ValueError(f"Linear {name!r}: its input's leading dim is not the batch dim")
        if acts and batch_first:
            result[name] = (torch.cat(acts, 1), torch.cat(outs, 1))
    return result


def _per_example_linear_grads(a: Tensor, g: Tensor) -> dict[str, Tensor]:
    return {"weight": torch.einsum("bto,bti->boi", g, a), "bias": g.sum(1)}


def _linear_squared_sums(a: Tensor, g: Tensor, chunk_size: int) -> dict[str, Tensor]:
    """Σ_n (per-example grad)² for weight and bias of one Linear."""
    if a.shape[1] == 1:  # one token per example: (g∘g)ᵀ(a∘a), a single matmul
        g2, a2 = g[:, 0].square(), a[:, 0].square()
        return {"weight": g2.t() @ a2, "bias": g2.sum(0)}
    sums: dict[str, Tensor] = {}
    for start in range(0, a.shape[0], chunk_size):
        part = _per_example_linear_grads(
            a[start : start + chunk_size], g[start : start + chunk_size]
        )
        for attr, value in part.items():
            sums[attr] = sums.get(attr, 0) + value.square().sum(0)
    return sums


def _verified_sites(
    model: nn.Module, sites: dict[str, _LinearSite], x: Tensor, y: Tensor, loss_fn: LossFn
) -> dict[str, _LinearSite]:
    """Keep only sites whose hook-derived per-example grads match autograd on a few examples.

    Catches layers whose weights are used outside `forward` (e.g. `MultiheadAttention.out_proj`),
    tied weights, and layers that see a non-batch-first layout; those fall back to vmap.
    """
    losses = _run_captured(model, sites, x, y, loss_fn)
    params = {n: p for n, p in model.named_parameters()}
    names = [pname for site in sites.values() for pname in site.params.values()]
    reference = [
        torch.autograd.grad(
            losses[n], [params[p] for p in names], retain_graph=True, allow_unused=True
        )
        for n in range(x.shape[0])
    ]
    captured = _site_tensors(sites, losses.sum(), x.shape[0], strict=False)
    kept, j = {}, 0
    for name, site in sites.items():
        derived = _per_example_linear_grads(*captured[name]) if name in captured else {}
        error, scale = 0.0 if derived else math.inf, 0.0
        for attr in site.params:
            for n, ref in enumerate(reference):
                expected = torch.zeros_like(params[names[j]]) if ref[j] is None else ref[j]
                if derived:
                    error = max(error, float((derived[attr][n] - expected).abs().max()))
                scale = max(scale, float(expected.abs().max()))
            j += 1
        if error <= 1e-3 * scale:  # relative to the layer's gradient scale: bias noise is fine
            site.rows = captured[name][0].shape[1]
            kept[name] = site
    return kept


def _worth_a_hook_pass(sites: dict[str, _LinearSite]) -> dict[str, _LinearSite]:
    """Sites to keep on the hook path when the vmap pass already runs forward and backward.

    Layers seeing several rows per example need per-example gradients materialised either way,
    so vmap takes them for free; one-row layers avoid that via (g∘g)ᵀ(a∘a), which beats the cost
    of an extra batched forward/backward only when they carry much of the compute.
    """
    macs = {name: site.module.weight.numel() * site.rows for name, site in sites.items()}
    single = {name: site for name, site in sites.items() if site.rows == 1}
    if sum(macs[name] for name in single) < _HOOK_PASS_SHARE * sum(macs.values()):
        return {}
    return single


def _vmap_squared_sums(
    model: nn.Module, names: list[str], loss_fn: LossFn
) -> Callable[[Tensor, Tensor], dict[str, Tensor]]:
    """Return f(x, y) -> {name: Σ_n grad_n²} for `names`, using per-sample grads from vmap."""
    params = dict(model.named_parameters())
    fixed = {n: p.detach() for n, p in params.items() if n not in names}
    fixed.update(dict(model.named_buffers()))
    diff = {n: params[n].detach() for n in names}

    def example_loss(weights: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, {**fixed, **weights}, (xi.unsqueeze(0),))
        return _example_losses(loss_fn, out, yi.unsqueeze(0)).sum()

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))

    def squared_sums(x: Tensor, y: Tensor) -> dict[str, Tensor]:
        # Fused SDPA kernels have no vmap batching rule (slow fallback); the math kernel has.
        with sdpa_kernel(SDPBackend.MATH):
            grads = per_example(diff, x, y)
        return {n: grads[n].square().sum(0) for n in names}

    return squared_sums


def _plan(
    model: nn.Module,
    trainable: dict[str, nn.Parameter],
    X: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    linear_fast_path: bool,
) -> tuple[dict[str, _LinearSite], list[str]]:
    """Split trainable parameters into verified closed-form Linear sites and the vmap rest."""
    sites = _linear_sites(model, trainable) if linear_fast_path else {}
    if sites:
        device = next(iter(trainable.values())).device
        x, t = X[:_PROBE_EXAMPLES].to(device), y[:_PROBE_EXAMPLES].to(device)
        sites = _verified_sites(model, sites, x, t, loss_fn)
    covered = {p for site in sites.values() for p in site.params.values()}
    if sites and len(covered) < len(trainable):
        sites = _worth_a_hook_pass(sites)
        covered = {p for site in sites.values() for p in site.params.values()}
    return sites, [n for n in trainable if n not in covered]


def fisher_paths(
    model: nn.Module, X: Tensor, y: Tensor, *, loss_fn: LossFn | None = None
) -> dict[str, str]:
    """Which path `diagonal_fisher` takes per trainable parameter: "linear" or "vmap".

    For diagnostics and benchmarks; only the first few examples of X/y are used.
    """
    _check_data(X, y)
    trainable = _trainable(model)
    with _eval_mode(model):
        _, rest = _plan(model, trainable, X, y, loss_fn or _cross_entropy, True)
    return {n: "vmap" if n in rest else "linear" for n in trainable}


def _add_batch(
    total: dict[str, Tensor],
    model: nn.Module,
    sites: dict[str, _LinearSite],
    vmap_sums: Callable[[Tensor, Tensor], dict[str, Tensor]] | None,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    chunk_size: int,
) -> None:
    """Add one batch's Σ_n grad_n² to `total`: hook path for `sites`, vmap for the rest."""
    if sites:
        losses = _run_captured(model, sites, x, y, loss_fn)
        for name, (a, g) in _site_tensors(sites, losses.sum(), x.shape[0]).items():
            for attr, value in _linear_squared_sums(a, g, chunk_size).items():
                if attr in sites[name].params:
                    total[sites[name].params[attr]] += value
    if vmap_sums is not None:
        for c in range(0, x.shape[0], chunk_size):
            for name, value in vmap_sums(x[c : c + chunk_size], y[c : c + chunk_size]).items():
                total[name] += value


def diagonal_fisher(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    *,
    batch_size: int = 256,
    loss_fn: LossFn | None = None,
    chunk_size: int = 64,
    linear_fast_path: bool = True,
) -> dict[str, Tensor]:
    """Empirical diagonal Fisher F_i = (1/N) Σ_n (∂ℓ(x_n, y_n)/∂θ_i)² from per-example gradients.

    Args:
        model: any module; estimated in eval mode, previous modes restored. `.grad` is untouched.
        X: inputs, float [N, F] / [N, T, D] or token ids long [N, L]; moved batch-wise to the model.
        y: targets [N] (class ids for the default cross-entropy).
        batch_size: examples per forward pass; the result does not depend on it.
        loss_fn: `(logits, target) -> per-example losses [B]`; default cross-entropy.
        chunk_size: examples per vmap call, bounds the memory of per-sample gradients.
        linear_fast_path: use the closed form for plain `nn.Linear` layers (False: vmap only).

    Returns:
        {parameter name: Fisher tensor} for every parameter with requires_grad, in
        `named_parameters()` order; float32 (float64 for a float64 model).

    Raises:
        ValueError: empty or mismatched data, no trainable parameters, or a loss_fn that does
            not return one loss per example.
    """
    _check_data(X, y)
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size}, {chunk_size}")
    loss_fn = loss_fn or _cross_entropy
    trainable = _trainable(model)
    device = next(iter(trainable.values())).device
    total = {
        n: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
        for n, p in trainable.items()
    }
    with _eval_mode(model):
        sites, rest = _plan(model, trainable, X, y, loss_fn, linear_fast_path)
        vmap_sums = _vmap_squared_sums(model, rest, loss_fn) if rest else None
        for start in range(0, X.shape[0], batch_size):
            xb = X[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device)
            _add_batch(total, model, sites, vmap_sums, xb, yb, loss_fn, chunk_size)
    return {n: value / X.shape[0] for n, value in total.items()}


def brute_force_fisher(
    model: nn.Module, X: Tensor, y: Tensor, loss_fn: LossFn | None = None
) -> dict[str, Tensor]:
    """Reference Fisher: one autograd pass per example, square, average. Slow; for tests/bench."""
    _check_data(X, y)
    loss_fn = loss_fn or _cross_entropy
    trainable = _trainable(model)
    device = next(iter(trainable.values())).device
    names, params = list(trainable), list(trainable.values())
    total = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in params]
    with _eval_mode(model):
        for n in range(X.shape[0]):
            xn, yn = X[n : n + 1].to(device), y[n : n + 1].to(device)
            loss = _example_losses(loss_fn, model(xn), yn).sum()
            for acc, g in zip(
                total, torch.autograd.grad(loss, params, allow_unused=True), strict=True
            ):
                if g is not None:
                    acc += g.square()
    return {name: acc / X.shape[0] for name, acc in zip(names, total, strict=True)}
