"""The closed-form per-example Fisher of plain `nn.Linear` layers (forward hooks, no vmap).

A Linear layer's per-example gradient is g aᵀ (g: the gradient at its output, a: its input),
so Σ_n grad_n² = (g∘g)ᵀ(a∘a): one matmul per layer for one row per example, per-example
gradients in chunks for [B, T, D] inputs or repeated calls. The (input, output) of every call
are taken from forward hooks, and each layer is verified against autograd on a few examples
first (`verified_sites`): weights used outside `forward`, tied weights or a non-batch-first
layout fall back to the vmap path of `continual.fisher`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from continual.fisher_kinds import LossFn, accumulator_dtype, example_losses
from continual.models import as_logits

# When a vmap pass is needed anyway, a separate hook pass only pays for one-row Linear layers
# holding at least this share of the Linear multiply-adds (measured in benchmarks/bench_fisher.py).
_HOOK_PASS_SHARE = 0.5


@dataclass
class LinearSite:
    """A plain `nn.Linear` whose trainable weight/bias use the closed-form path."""

    module: nn.Linear
    params: dict[str, str]  # attribute ("weight"/"bias") -> parameter name in the model
    records: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (input, output) per call
    rows: int = 1  # rows per example seen by the layer (T, summed over calls)


def linear_sites(model: nn.Module, trainable: dict[str, nn.Parameter]) -> dict[str, LinearSite]:
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
            sites[mod_name] = LinearSite(mod, params)
    return sites


def run_captured(model: nn.Module, sites: dict[str, LinearSite], x: Tensor) -> Tensor:
    """Forward pass recording each site's (input, output) per call; returns the logits."""
    handles = []
    for site in sites.values():
        site.records = []

        def hook(
            _m: nn.Module, inputs: tuple[Tensor, ...], out: Tensor, s: LinearSite = site
        ) -> None:
            s.records.append((inputs[0].detach(), out))

        handles.append(site.module.register_forward_hook(hook))
    try:
        return as_logits(model(x))
    finally:
        for handle in handles:
            handle.remove()


def site_tensors(
    sites: dict[str, LinearSite],
    root: Tensor,
    vectors: Tensor | None,
    batch: int,
    *,
    strict: bool = True,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-site activations a [B, T, Din] and output grads g [K, B, T, Dout], calls joined on T.

    The grads are those of `root` (a scalar when `vectors` is None, K = 1) or of ⟨root, vectors[k]⟩
    for each of the K backward vectors. A layer applied to [B, T, D] inputs, or called several
    times, has per-example grad Σ_t g_t a_tᵀ; joining everything on T keeps one formula for all
    cases. A site whose leading dim is not the batch raises (strict) or is left out (probe).
    """
    outputs = [out for site in sites.values() for _, out in site.records]
    if not outputs:
        return {}
    grad_outputs = [None] if vectors is None else list(vectors)
    per_vector = [
        torch.autograd.grad(
            root, outputs, v, retain_graph=k < len(grad_outputs) - 1, allow_unused=True
        )
        for k, v in enumerate(grad_outputs)
    ]
    grads = [_stack_vectors([s[j] for s in per_vector]) for j in range(len(outputs))]
    result, i = {}, 0
    for name, site in sites.items():
        acts, outs, batch_first = [], [], True
        for (a, _), g in zip(site.records, grads[i : i + len(site.records)], strict=True):
            if g is not None:
                batch_first = batch_first and a.shape[0] == batch == g.shape[1]
                acts.append(a.reshape(a.shape[0], -1, a.shape[-1]))
                outs.append(g.reshape(*g.shape[:2], -1, g.shape[-1]))
        i += len(site.records)
        site.records = []
        if not batch_first and strict:
            raise ValueError(f"Linear {name!r}: its input's leading dim is not the batch dim")
        if acts and batch_first:
            result[name] = (_join(acts, 1), _join(outs, 2))
    return result


def _stack_vectors(grads: list[Tensor | None]) -> Tensor | None:
    """[K, ...] from the K grads of one output (None: unused); no copy for K = 1."""
    present = [g for g in grads if g is not None]
    if len(present) < len(grads):  # an output is unused for every vector or for none
        return None
    return present[0].unsqueeze(0) if len(present) == 1 else torch.stack(present)


def _join(tensors: list[Tensor], dim: int) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def _per_example_linear_grads(a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Per-example weight/bias grads from a [B, T, Din] and g [..., B, T, Dout]."""
    return {"weight": torch.einsum("...to,...ti->...oi", g, a), "bias": g.sum(-2)}


def linear_squared_sums(a: Tensor, g: Tensor, chunk_size: int) -> dict[str, Tensor]:
    """Σ_n Σ_k (per-example grad)² for weight and bias of one Linear, g [K, B, T, Dout]."""
    dtype = accumulator_dtype(a.dtype)
    a, g = a.to(dtype), g.to(dtype)
    if a.shape[1] == 1:  # one token per example: (Σ_k g_k∘g_k)ᵀ(a∘a), a single matmul
        g2 = g[0, :, 0].square() if g.shape[0] == 1 else g[:, :, 0].square().sum(0)
        a2 = a[:, 0].square()
        return {"weight": g2.t() @ a2, "bias": g2.sum(0)}
    sums: dict[str, Tensor] = {}
    for start in range(0, a.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        part = _per_example_linear_grads(a[rows], g[:, rows])
        for attr, value in part.items():
            sums[attr] = sums.get(attr, 0) + value.square().sum((0, 1))
    return sums


def verified_sites(
    model: nn.Module, sites: dict[str, LinearSite], x: Tensor, y: Tensor, loss_fn: LossFn
) -> dict[str, LinearSite]:
    """Keep only sites whose hook-derived per-example grads match autograd on a few examples.

    Catches layers whose weights are used outside `forward` (e.g. `MultiheadAttention.out_proj`),
    tied weights, and layers that see a non-batch-first layout; those fall back to vmap.
    """
    losses = example_losses(loss_fn, run_captured(model, sites, x), y)
    params = {n: p for n, p in model.named_parameters()}
    names = [pname for site in sites.values() for pname in site.params.values()]
    reference = [
        torch.autograd.grad(
            losses[n], [params[p] for p in names], retain_graph=True, allow_unused=True
        )
        for n in range(x.shape[0])
    ]
    captured = site_tensors(sites, losses.sum(), None, x.shape[0], strict=False)
    kept, j = {}, 0
    for name, site in sites.items():
        derived = {}
        if name in captured:
            derived = _per_example_linear_grads(captured[name][0], captured[name][1][0])
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


def worth_a_hook_pass(sites: dict[str, LinearSite]) -> dict[str, LinearSite]:
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
