"""Per-example diagonal Fisher: the importance weights behind EWC and Fisher-weighted merges.

Kept apart from `continual.ewc` because estimating the Fisher is the costly, intricate part and
the penalty only consumes its output. The Fisher is the mean of **per-example** squared
gradients: squaring the gradient of a mini-batch mean instead gives roughly F/|B|, which makes λ
silently depend on the batch size.

Three kinds (`kind=`), all from per-example gradients g_c = ∂ℓ(x, c)/∂θ:
- "empirical": g² at the true label y. Grows with (p − y)² where the model fits badly, so after a
  drift it can grow by orders of magnitude and stiffen the model, which then fits worse.
- "true": the expected Fisher Σ_c p_c(x)·g_c² under the model's own predictive distribution p
  (softmax of the logits), computed exactly. It does not depend on the labels, so it cannot feed
  back on a bad fit. Costs C − 1 backward passes per example (C with a custom loss_fn).
- "sampled": g² at labels ŷ ~ p drawn with a seeded generator (`n_samples` per example): an
  unbiased estimate of the true Fisher at the cost of one empirical pass.
- "auto" (the default, also EWC's): "true" up to `TRUE_FISHER_MAX_CLASSES` = 16 classes, else
  "sampled". Exact, label-free and noise-free while C stays small; the Fisher is computed once
  per model version, never per step, so its cost is paid once. Measured with 10 classes, N=2048,
  one CPU thread (benchmarks/bench_fisher.py), against the cheap biased estimate most libraries
  ship (squared mini-batch gradients, |B| = 64 / 256): "empirical" and "sampled" 0.9-1.4× /
  1.4-2.0×; "true" 3.2× / 4.7× on an all-Linear MLP, 9× / 13× on a transformer. With hundreds
  of classes, or a large model on the vmap path, pass kind="sampled" (same quality on the
  permuted-digits forgetting test: 0.199 with either).

How: every kind is a set of K backward vectors v at the logits per example (empirical: ∂ℓ/∂z at
y; true: a factor of Σ_c p_c (∂ℓ(z, c)/∂z)(·)ᵀ — for cross-entropy diag(p) − ppᵀ, C − 1 vectors;
sampled: ∂ℓ(z, ŷ_s)/∂z / √S), and F = (1/N) Σ_n Σ_k (J_nᵀ v_nk)² with J = ∂z/∂θ. Per-example gradients are cheap for `nn.Linear` (per-example grad =
g aᵀ, so Σ_n grad_n² = (g∘g)ᵀ(a∘a): one matmul per layer, taken from forward hooks and verified
per layer against autograd on a few examples); every other trainable parameter gets per-sample
gradients from `torch.func.vmap` over `vjp(functional_call)`, in chunks so memory stays bounded.
Squares are taken and summed in float32 (or the promoted type), also for bf16/fp16 models.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from continual.models import as_logits

__all__ = [
    "FISHER_KINDS",
    "TRUE_FISHER_MAX_CLASSES",
    "FisherKind",
    "LossFn",
    "brute_force_fisher",
    "diagonal_fisher",
    "fisher_paths",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
FisherKind = Literal["auto", "empirical", "true", "sampled"]
FISHER_KINDS: tuple[str, ...] = ("auto", "empirical", "true", "sampled")
TRUE_FISHER_MAX_CLASSES = 16  # "auto": exact expectation up to this many classes, else sampled
_CHUNK_VALUES = 2**24  # default bound on per-sample gradient values held at once
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


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _square(g: Tensor) -> Tensor:
    return g.to(_accumulator_dtype(g.dtype)).square()


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True")
    return trainable


def _check_args(X: Tensor, y: Tensor, kind: str, n_samples: int) -> None:
    if X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise ValueError(
            f"X and y need the same, non-zero number of rows; got {X.shape[0]} and {y.shape[0]}"
        )
    if kind not in FISHER_KINDS:
        raise ValueError(f"unknown Fisher kind {kind!r}; expected one of {FISHER_KINDS}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")


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


def _resolve_kind(
    kind: str, model: nn.Module, x: Tensor, n_samples: int, loss_fn: LossFn
) -> tuple[str, int]:
    """The kind ("auto": "true" up to TRUE_FISHER_MAX_CLASSES logits, else "sampled") and K,
    the number of backward vectors per example."""
    with torch.no_grad():
        classes = as_logits(model(x)).shape[-1]
    if kind == "auto":
        kind = "true" if classes <= TRUE_FISHER_MAX_CLASSES else "sampled"
    if kind == "true":
        return kind, classes - 1 if _factorised(loss_fn, classes) else classes
    return kind, 1 if kind == "empirical" else n_samples


def _factorised(loss_fn: LossFn, classes: int) -> bool:
    """Cross-entropy's true Fisher at the logits, diag(p) − ppᵀ, has rank C − 1."""
    return loss_fn is _cross_entropy and classes >= 2


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


def _draws(n: int, kind: str, n_samples: int, seed: int) -> Tensor:
    """Uniforms [N, S] for the sampled labels, fixed per example whatever the batching."""
    if kind != "sampled":
        return torch.zeros(n, 1)
    return torch.rand(n, n_samples, generator=torch.Generator().manual_seed(seed))


def _sample_labels(p: Tensor, u: Tensor) -> Tensor:
    """Labels [B, S] drawn from p [B, C] by inverse CDF of the uniforms u [B, S]; vmap-safe."""
    below = p.cumsum(-1).unsqueeze(-2) < u.unsqueeze(-1)
    return below.sum(-1).clamp(max=p.shape[-1] - 1)


def _loss_grads(loss_fn: LossFn, z: Tensor, targets: Tensor) -> Tensor:
    """∂ℓ(z_n, t_n)/∂z_n per row (a per-example loss depends on its own row only)."""
    if loss_fn is _cross_entropy and z.dim() == 2:  # closed form, no autograd call
        return torch.softmax(z, dim=-1) - F.one_hot(targets, z.shape[-1]).to(z.dtype)
    return grad(lambda logits: _example_losses(loss_fn, logits, targets).sum())(z)


def _backward_vectors(kind: str, loss_fn: LossFn, z: Tensor, y: Tensor, u: Tensor) -> Tensor:
    """Backward vectors [K, B, C] at the logits z [B, C]: F = Σ_n Σ_k (J_nᵀ v_nk)²."""
    z = z.detach().to(_accumulator_dtype(z.dtype))
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
        labels = _sample_labels(p, u.to(z.device)).t()
        weights = torch.full(labels.shape, labels.shape[0] ** -0.5, dtype=z.dtype, device=z.device)
    k = labels.shape[0]
    rows = z.unsqueeze(0).expand(k, batch, classes).reshape(k * batch, classes)
    g = _loss_grads(loss_fn, rows, labels.reshape(-1)).view(k, batch, classes)
    return g * weights.unsqueeze(-1)


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


def _run_captured(model: nn.Module, sites: dict[str, _LinearSite], x: Tensor) -> Tensor:
    """Forward pass recording each site's (input, output) per call; returns the logits."""
    handles = []
    for site in sites.values():
        site.records = []

        def hook(
            _m: nn.Module, inputs: tuple[Tensor, ...], out: Tensor, s: _LinearSite = site
        ) -> None:
            s.records.append((inputs[0].detach(), out))

        handles.append(site.module.register_forward_hook(hook))
    try:
        return as_logits(model(x))
    finally:
        for handle in handles:
            handle.remove()


def _site_tensors(
    sites: dict[str, _LinearSite],
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
    first = grads[0]
    if first is None:
        return None
    return first.unsqueeze(0) if len(grads) == 1 else torch.stack(grads)  # type: ignore[arg-type]


def _join(tensors: list[Tensor], dim: int) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def _per_example_linear_grads(a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Per-example weight/bias grads from a [B, T, Din] and g [..., B, T, Dout]."""
    return {"weight": torch.einsum("...to,...ti->...oi", g, a), "bias": g.sum(-2)}


def _linear_squared_sums(a: Tensor, g: Tensor, chunk_size: int) -> dict[str, Tensor]:
    """Σ_n Σ_k (per-example grad)² for weight and bias of one Linear, g [K, B, T, Dout]."""
    dtype = _accumulator_dtype(a.dtype)
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


def _verified_sites(
    model: nn.Module, sites: dict[str, _LinearSite], x: Tensor, y: Tensor, loss_fn: LossFn
) -> dict[str, _LinearSite]:
    """Keep only sites whose hook-derived per-example grads match autograd on a few examples.

    Catches layers whose weights are used outside `forward` (e.g. `MultiheadAttention.out_proj`),
    tied weights, and layers that see a non-batch-first layout; those fall back to vmap.
    """
    losses = _example_losses(loss_fn, _run_captured(model, sites, x), y)
    params = {n: p for n, p in model.named_parameters()}
    names = [pname for site in sites.values() for pname in site.params.values()]
    reference = [
        torch.autograd.grad(
            losses[n], [params[p] for p in names], retain_graph=True, allow_unused=True
        )
        for n in range(x.shape[0])
    ]
    captured = _site_tensors(sites, losses.sum(), None, x.shape[0], strict=False)
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
    model: nn.Module, names: list[str], loss_fn: LossFn, kind: str, one_at_a_time: bool
) -> Callable[[Tensor, Tensor, Tensor], dict[str, Tensor]]:
    """Return f(x, y, u) -> {name: Σ_n Σ_k grad_nk²} for `names`, per-sample grads from vmap."""
    params = dict(model.named_parameters())
    fixed = {n: p.detach() for n, p in params.items() if n not in names}
    fixed.update(dict(model.named_buffers()))
    diff = {n: params[n].detach() for n in names}

    def example_squares(
        weights: dict[str, Tensor], xi: Tensor, yi: Tensor, ui: Tensor
    ) -> dict[str, Tensor]:
        def logits(w: dict[str, Tensor]) -> Tensor:
            return as_logits(functional_call(model, {**fixed, **w}, (xi.unsqueeze(0),)))

        z, pullback = vjp(logits, weights)
        vectors = _backward_vectors(kind, loss_fn, z, yi.unsqueeze(0), ui.unsqueeze(0)).to(z.dtype)
        if vectors.shape[0] == 1:  # a sum over a size-1 dim would cost another copy
            return {n: _square(g) for n, g in pullback(vectors[0])[0].items()}
        if not one_at_a_time:
            return {n: _square(g).sum(0) for n, g in vmap(pullback)(vectors)[0].items()}
        sums = {n: _square(g) for n, g in pullback(vectors[0])[0].items()}
        for vector in vectors[1:]:
            for n, g in pullback(vector)[0].items():
                sums[n] = sums[n] + _square(g)
        return sums

    per_example = vmap(example_squares, in_dims=(None, 0, 0, 0))

    def squared_sums(x: Tensor, y: Tensor, u: Tensor) -> dict[str, Tensor]:
        # Fused SDPA kernels have no vmap batching rule (slow fallback); the math kernel has.
        with sdpa_kernel(SDPBackend.MATH):
            squares = per_example(diff, x, y, u)
        return {n: squares[n].sum(0) for n in names}

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
    _check_args(X, y, "auto", 1)
    trainable = _trainable(model)
    with _eval_mode(model):
        _, rest = _plan(model, trainable, X, y, loss_fn or _cross_entropy, True)
    return {n: "vmap" if n in rest else "linear" for n in trainable}


def _add_batch(
    total: dict[str, Tensor],
    model: nn.Module,
    sites: dict[str, _LinearSite],
    vmap_sums: Callable[[Tensor, Tensor, Tensor], dict[str, Tensor]] | None,
    batch: tuple[Tensor, Tensor, Tensor],
    kind: str,
    loss_fn: LossFn,
    chunk_size: int,
) -> None:
    """Add one batch's Σ_n Σ_k grad_nk² to `total`: hook path for `sites`, vmap for the rest."""
    x, y, u = batch
    if sites:
        z = _run_captured(model, sites, x)
        vectors = _backward_vectors(kind, loss_fn, z, y, u).to(z.dtype)
        for name, (a, g) in _site_tensors(sites, z, vectors, x.shape[0]).items():
            for attr, value in _linear_squared_sums(a, g, chunk_size).items():
                if attr in sites[name].params:
                    total[sites[name].params[attr]] += value
    if vmap_sums is not None:
        for c in range(0, x.shape[0], chunk_size):
            part = vmap_sums(x[c : c + chunk_size], y[c : c + chunk_size], u[c : c + chunk_size])
            for name, value in part.items():
                total[name] += value


def diagonal_fisher(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    *,
    kind: FisherKind = "auto",
    n_samples: int = 1,
    seed: int = 0,
    batch_size: int = 256,
    loss_fn: LossFn | None = None,
    chunk_size: int | None = None,
    linear_fast_path: bool = True,
) -> dict[str, Tensor]:
    """Diagonal Fisher F_i = (1/N) Σ_n E[(∂ℓ(x_n, ·)/∂θ_i)²] from per-example gradients.

    Args:
        model: any module; estimated in eval mode, previous modes restored. `.grad` is untouched.
        X: inputs, float [N, F] / [N, T, D] or token ids long [N, L]; moved batch-wise to the model.
        y: targets [N] (class ids for the default cross-entropy); only "empirical" uses them.
        kind: "empirical", "true", "sampled" or "auto" (see the module docstring).
        n_samples: labels drawn per example for "sampled".
        seed: seeds the label draws of "sampled"; the result does not depend on batching.
        batch_size: examples per forward pass; the result does not depend on it.
        loss_fn: `(logits, target) -> per-example losses [B]`; default cross-entropy. For "true"
            and "sampled" the predictive distribution is softmax(logits), logits [B, C].
        chunk_size: examples per vmap call; bounds the memory of per-sample gradients (about
            chunk_size × K × parameters, K = 1, n_samples or the number of classes). None: as
            many as keep that under 2**24 values (64 MB in float32), at most batch_size.
        linear_fast_path: use the closed form for plain `nn.Linear` layers (False: vmap only).

    Returns:
        {parameter name: Fisher tensor} for every parameter with requires_grad, in
        `named_parameters()` order; float32 (float64 for a float64 model), also for bf16 models.

    Raises:
        ValueError: empty or mismatched data, unknown kind, no trainable parameters, or a
            loss_fn that does not return one loss per example.
    """
    _check_args(X, y, kind, n_samples)
    if batch_size < 1 or (chunk_size is not None and chunk_size < 1):
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size}, {chunk_size}")
    loss_fn = loss_fn or _cross_entropy
    trainable = _trainable(model)
    device = next(iter(trainable.values())).device
    total = {
        n: torch.zeros_like(p, dtype=_accumulator_dtype(p.dtype)) for n, p in trainable.items()
    }
    with _eval_mode(model):
        kind, vectors = _resolve_kind(kind, model, X[:1].to(device), n_samples, loss_fn)
        per_example = vectors * sum(p.numel() for p in trainable.values())
        chunk = chunk_size or max(1, min(batch_size, _CHUNK_VALUES // per_example))
        draws = _draws(X.shape[0], kind, n_samples, seed)
        sites, rest = _plan(model, trainable, X, y, loss_fn, linear_fast_path)
        # K per-example gradients of one example above the budget: take them one at a time
        one_at_a_time = per_example > _CHUNK_VALUES
        vmap_sums = _vmap_squared_sums(model, rest, loss_fn, kind, one_at_a_time) if rest else None
        for start in range(0, X.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            batch = (X[rows].to(device), y[rows].to(device), draws[rows].to(device))
            _add_batch(total, model, sites, vmap_sums, batch, kind, loss_fn, chunk)
    return {n: value / X.shape[0] for n, value in total.items()}


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
    _check_args(X, y, kind, n_samples)
    loss_fn = loss_fn or _cross_entropy
    trainable = _trainable(model)
    device = next(iter(trainable.values())).device
    names, params = list(trainable), list(trainable.values())
    total = [torch.zeros_like(p, dtype=_accumulator_dtype(p.dtype)) for p in params]
    with _eval_mode(model):
        kind, _ = _resolve_kind(kind, model, X[:1].to(device), n_samples, loss_fn)
        draws = _draws(X.shape[0], kind, n_samples, seed)
        for n in range(X.shape[0]):
            z = as_logits(model(X[n : n + 1].to(device)))
            p = torch.softmax(z.detach().to(_accumulator_dtype(z.dtype)), dim=-1)
            if kind == "empirical":
                labels, weights = y[n : n + 1].to(device), torch.ones(1, dtype=p.dtype)
            elif kind == "true":
                labels, weights = torch.arange(p.shape[-1], device=device), p[0]
            else:
                labels = _sample_labels(p, draws[n : n + 1].to(device))[0]
                weights = torch.full(labels.shape, 1.0 / n_samples, dtype=p.dtype)
            for label, weight in zip(labels, weights, strict=True):
                loss = _example_losses(loss_fn, z, label.view(1)).sum()
                grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                for acc, g in zip(total, grads, strict=True):
                    if g is not None:
                        acc += weight.to(acc.device) * g.to(acc.dtype).square()
    return {name: acc / X.shape[0] for name, acc in zip(names, total, strict=True)}
